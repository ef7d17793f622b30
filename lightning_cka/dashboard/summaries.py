"""The monitor's figures as TensorBoard tensor summaries of the ``lightning_cka`` plugin.

Each figure of a probe becomes one summary: its tag, ``SummaryMetadata`` naming the plugin (with the tensor data
class, which TensorBoard's fast loader needs), and a scalar string tensor holding the figure's JSON
(:func:`lightning_cka.figures.spec.to_json`). The dashboard reads them back through TensorBoard's data provider, so
remote log directories and both loaders work.
"""

import json
from collections.abc import Sequence
from typing import Any

from tensorboard.compat.proto.summary_pb2 import DataClass, Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

from lightning_cka.figures.spec import Figure, to_json

PLUGIN_NAME = "lightning_cka"
PLUGIN_CONTENT = json.dumps({"version": 1}).encode()


def figure_summary(figure: Figure, tag: str) -> Summary:
    """The ``Summary`` proto of one figure under ``tag``."""
    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=PLUGIN_CONTENT),
        data_class=DataClass.DATA_CLASS_TENSOR,
    )
    tensor = TensorProto(
        dtype="DT_STRING",
        tensor_shape=TensorShapeProto(),
        string_val=[json.dumps(to_json(figure), allow_nan=False).encode()],
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata, tensor=tensor)])


def write_figures(writer: Any, figures: Sequence[Figure], step: int, prefix: str = "") -> None:
    """Write every figure to a torch ``SummaryWriter`` (what ``TensorBoardLogger.experiment`` is) at ``step``."""
    file_writer = writer._get_file_writer()  # SummaryWriter has no public way to add a Summary proto
    for figure in figures:
        file_writer.add_summary(figure_summary(figure, prefix + figure.tag), global_step=step)
    writer.flush()

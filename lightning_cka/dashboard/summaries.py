"""Figures as TensorBoard tensor summaries, the data the "CKA" tab reads.

One summary per figure and probe step: a scalar string tensor holding the UTF-8 JSON of
:func:`lightning_cka.figures.spec.to_json`, under the figure's tag (prefixed with the monitor's name when it has one)
followed by ``TAG_SUFFIX``, with plugin name ``lightning_cka``. The figure's title and caption go into the summary's
``display_name`` and ``summary_description``, so the dashboard lists figures without decoding them.
"""

import json
import time
from collections.abc import Iterable
from typing import Any

from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

from lightning_cka.figures.spec import Figure, to_json

PLUGIN_NAME = "lightning_cka"
# Bumped only when a reader could misread newer data; the plugin skips versions it does not know.
METADATA_VERSION = 1
METADATA_CONTENT = json.dumps({"version": METADATA_VERSION}).encode()
# TensorBoard keeps the metadata of the first summary it reads under a tag: the PNG the monitor logs under the
# figure's tag (Images tab) would hide the figure's tensor from this plugin, so the tensors get tags of their own.
TAG_SUFFIX = "/figure"


def summary_tag(tag: str) -> str:
    """The tag the figure ``tag`` is written under: ``summary_tag("cka/intra") == "cka/intra/figure"``."""
    return tag + TAG_SUFFIX


def figure_tag(tag: str) -> str:
    """The figure's tag from a summary's (files written before ``TAG_SUFFIX`` carry the figure's tag itself)."""
    return tag.removesuffix(TAG_SUFFIX)


def figure_json(figure: Figure) -> bytes:
    """The figure as compact UTF-8 JSON, exactly what a summary's tensor holds (NaN and inf are ``null``)."""
    # allow_nan=False: strict JSON, which browsers parse; to_json has already made every non-finite number None
    return json.dumps(to_json(figure), separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()


def figure_summary(figure: Figure, tag: str | None = None) -> summary_pb2.Summary:
    """A ``Summary`` proto with one value: ``figure`` as a scalar ``DT_STRING`` tensor of plugin ``lightning_cka``.

    Args:
        figure: the figure; its ``meta`` should hold ``step``, ``run``, ``probe`` and ``num_examples``.
        tag: the summary's tag; ``figure.tag`` when ``None``.

    Example:
        >>> from lightning_cka.figures.spec import Figure
        >>> value = figure_summary(Figure("cka/intra", "CKA", ()), "coarse/cka/intra").value[0]
        >>> value.tag, value.metadata.plugin_data.plugin_name, value.metadata.display_name
        ('coarse/cka/intra', 'lightning_cka', 'CKA')
    """
    metadata = summary_pb2.SummaryMetadata(
        display_name=figure.title,
        summary_description=figure.caption,
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=METADATA_CONTENT),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(), string_val=[figure_json(figure)]
    )
    return summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=tag or figure.tag, metadata=metadata, tensor=tensor)]
    )


def prefixed_tag(tag: str, prefix: str = "") -> str:
    """``tag`` under the monitor's name: ``prefixed_tag("cka/intra", "coarse") == "coarse/cka/intra"``."""
    prefix = prefix.strip("/")
    return f"{prefix}/{tag}" if prefix else tag


def write_figures(writer: Any, figures: Iterable[Figure], step: int, prefix: str = "") -> None:
    """Write each figure as one tensor summary at ``step``.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (what Lightning's ``TensorBoardLogger.experiment`` is).
        figures: the probe's figures.
        step: the global step of the probe.
        prefix: the monitor's name, prepended to every tag (``"coarse"`` gives ``coarse/cka/intra``); none when empty.
    """
    file_writer = writer._get_file_writer()  # the SummaryWriter's own event file, recreated if it was closed
    wall_time = time.time()
    for figure in figures:
        file_writer.add_summary(figure_summary(figure, summary_tag(prefixed_tag(figure.tag, prefix))), step, wall_time)

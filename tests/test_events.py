"""Events over training: each one where it happens by construction, and none where it does not.

Histories of probes are built with a planted trace (a head whose distance falls through the local threshold, a
layer whose rank collapses, ...) next to traces that wander near a threshold without crossing it clearly; each event
must fire exactly at its step, and the wandering traces must stay quiet. The last test plants a collapse inside a
real fit and finds the event in the probe file, in the logged scalars, and in the report's timeline.
"""

import json

import numpy as np
import pytest

from lightning_cka.analyses import AttentionStats, EffectiveRank, LayerCKA
from lightning_cka.findings import Criteria
from lightning_cka.result import CKAResult

LAYERS = ["blocks.0", "blocks.1"]
UNIFORM = 16.5  # px: the local threshold is 8.25 px, the hysteresis band 7.425-9.075 px


def history(**traces):
    """One probe per step from per-field traces: ``field=[value at step 0, at step 10, ...]``."""
    steps = len(next(iter(traces.values())))
    probes = []
    for i in range(steps):
        fields = {key: np.asarray(values[i], dtype=np.float64) for key, values in traces.items()}
        probes.append(CKAResult({"layers": LAYERS, **fields}, step=10 * i))
    return probes


def attention_history(head0, head1):
    """Two heads of blocks.0 (blocks.1's heads stay global) with the given distance traces."""
    distances = [[[a, b], [15.0, 15.0]] for a, b in zip(head0, head1, strict=True)]
    return [
        CKAResult(
            {
                "layers": LAYERS,
                "attention_layers": LAYERS,
                "mean_attention_distance": np.array(d),
                "attention_entropy": np.full((2, 2), 2.0),
                "uniform_attention_distance": UNIFORM,
            },
            step=10 * i,
        )
        for i, d in enumerate(distances)
    ]


def kinds(events):
    return [(e.step, e.kind, e.subject) for e in events]


def test_a_head_becoming_local_and_losing_it_are_told_once_each_and_a_wandering_head_is_not():
    crossing = [12.0, 9.0, 7.0, 7.8, 8.8, 9.5, 12.0]  # local at step 20, back above 9.075 px at step 50
    wandering = [8.6, 8.0, 8.5, 7.9, 8.7, 8.1, 8.4]  # around 8.25 px, never out of the band
    events = AttentionStats().events(attention_history(crossing, wandering), Criteria())
    assert kinds(events) == [(20, "head_local", "blocks.0 head 0"), (50, "head_global", "blocks.0 head 0")]
    assert "7.0 px, below the 8.2 px threshold (it was 9.0 px at step 10)" in events[0].text
    # without the band, the wandering head flickers: the hysteresis criterion is what keeps events rare
    flickering = AttentionStats().events(attention_history(crossing, wandering), Criteria({"attention.hysteresis": 0}))
    assert sum(e.subject == "blocks.0 head 1" for e in flickering) >= 4


def test_a_head_local_from_the_start_is_no_event():
    assert AttentionStats().events(attention_history([3.0] * 4, [15.0] * 4), Criteria()) == []


def test_attention_collapsing_onto_one_token_is_told_when_it_happens():
    entropy = [np.log(5.0), np.log(3.0), np.log(1.5), np.log(1.2)]  # 5, 3, 1.5 and 1.2 tokens
    probes = attention_history([15.0] * 4, [15.0] * 4)
    for probe, value in zip(probes, entropy, strict=True):
        probe.attention_entropy = np.array([[value, value], [2.0, 2.0]])
    events = AttentionStats().events(probes, Criteria())
    assert kinds(events) == [(20, "entropy_collapse", "blocks.0")]
    assert "1.50 tokens" in events[0].text


def test_a_block_that_stopped_changing_is_told_once_after_three_probes():
    previous = [
        [[0.9, 0.5], [0.5, 0.95]],
        [[0.995, 0.5], [0.5, 0.98]],
        [[0.996, 0.5], [0.5, 0.999]],
        [[0.997, 0.5], [0.5, 0.98]],
        [[0.999, 0.5], [0.5, 0.999]],
    ]
    probes = history(previous=previous)
    events = LayerCKA().events(probes, Criteria())
    assert kinds(events) == [(30, "block_stable", "blocks.0")]
    assert "0.995, 0.996, 0.997" in events[0].text
    assert kinds(LayerCKA().events(probes, Criteria({"cka.stable_probes": 2}))) == [(20, "block_stable", "blocks.0")]


def test_a_layer_starts_and_stops_matching_the_reference_only_beyond_its_interval():
    best = [0.50, 0.58, 0.70, 0.66, 0.61, 0.45]  # blocks.0's best CKA with the reference over training
    reference = [[[v, v - 0.1], [0.3, 0.2]] for v in best]
    se = [[[0.01, 0.01], [0.01, 0.01]]] * len(best)  # t(7) * 0.01 = 0.024
    probes = history(reference=reference, reference_se=se)
    for probe in probes:
        probe.reference_layers = ["layer1", "layer2"]
        probe.num_minibatches = 8
    events = LayerCKA().events(probes, Criteria())
    assert kinds(events) == [(20, "matching", "blocks.0"), (50, "not_matching", "blocks.0")]
    assert "with layer1, is 0.700 ± 0.024" in events[0].text  # 0.61 at step 40 is inside the interval: no event


def test_a_probe_dominated_by_a_few_images_is_told_when_it_starts():
    probes = history(influence_share=[[0.05, 0.04], [0.62, 0.05], [0.7, 0.05], [0.05, 0.05], [0.04, 0.55]])
    for probe in probes:
        probe.influence_images = np.array([[17, 3, 5], [8, 9, 10]])
    events = LayerCKA().events(probes, Criteria())
    assert kinds(events) == [(10, "influence", "blocks.0"), (40, "influence", "blocks.1")]
    assert "62%" in events[0].text and "probe images 17, 3, 5" in events[0].text


def test_a_sharp_fall_of_effective_rank_is_told_and_a_gentle_one_is_not():
    probes = history(effective_rank=[[20.0, 20.0], [18.0, 14.0], [17.0, 4.0], [10.0, 3.9]])
    events = EffectiveRank().events(probes, Criteria())
    assert kinds(events) == [(20, "rank_collapse", "blocks.1")]  # not 20 -> 14 (30 %), nor 17 -> 10 (41 %)
    assert "from 14.0 to 4.0 (by 71%)" in events[0].text


# ---------------------------------------------------------------------------------------------------- in a fit


@pytest.fixture(scope="module")
def collapsing_fit(tmp_path_factory):
    """A small ViT whose block 1 output becomes one number per image from step 16 on: a true rank collapse."""
    import pytorch_lightning as pl
    import timm
    import torch
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_cka import CKAMonitor

    class Squeeze(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.on = False

        def forward(self, x):
            return x.mean(dim=(1, 2), keepdim=True).expand_as(x).contiguous() if self.on else x

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = timm.create_model("test_vit", num_classes=4, img_size=32, patch_size=8)
            self.squeeze = Squeeze()
            self.model.blocks[1].register_forward_hook(lambda m, i, o: self.squeeze(o))

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, index):
            self.squeeze.on = self.global_step >= 15  # on for the steps before the probe at step 20
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 4, (64,))
    root = tmp_path_factory.mktemp("collapse")
    monitor = CKAMonitor(every_n_train_steps=10, probe_data=x[:32], batch_size=8, analyses=["cka", "rank"], seed=0)
    trainer = pl.Trainer(
        max_steps=30,
        callbacks=[monitor],
        logger=[TensorBoardLogger(root, name="tb", version=0), CSVLogger(root, name="csv", version=0)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Model(), DataLoader(TensorDataset(x, y), batch_size=8))
    return root


def test_a_planted_collapse_is_in_the_probe_file_the_scalars_and_the_report(collapsing_fit):
    from lightning_cka.cli import main

    folder = collapsing_fit / "tb" / "version_0"
    stored = {
        int(f.stem.split("_")[1]): CKAResult.load(f).get("events") for f in sorted((folder / "cka").glob("step_*.npz"))
    }
    assert stored[0] is None and stored[10] is None
    events = json.loads(stored[20])
    # block 1 and every block after it (they only see its squeezed output), not block 0
    assert [(e["kind"], e["subject"]) for e in events] == [("rank_collapse", f"blocks.{i}") for i in range(1, 6)]
    metrics = (collapsing_fit / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert "events/rank_collapse" in header
    column = header.index("events/rank_collapse")
    marked = [
        (row.split(",")[header.index("step")], row.split(",")[column]) for row in metrics[1:] if row.split(",")[column]
    ]
    assert marked == [("20", "5.0")]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    board.Reload()
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in board.Tensors("events/text_summary")}
    assert list(texts) == [20, 30] and texts[20].count("**rank_collapse**") == 5
    out = collapsing_fit / "report.html"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    assert "The effective rank of blocks.1 fell" in out.read_text()

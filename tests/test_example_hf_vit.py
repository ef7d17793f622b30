"""examples/hf_vit_digits.py: a Hugging Face ViT trained on the digits with the monitor, run for a few steps."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_cka import CKAResult

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
example = importlib.import_module("hf_vit_digits")


def test_the_example_trains_a_hf_vit_and_probes_every_analysis(tmp_path):
    torch.set_num_threads(1)
    tiny = ["--max-steps", "4", "--cka-every", "2", "--val-every", "2", "--probe-size", "16", "--cka-batch-size", "8"]
    tiny += ["--batch-size", "16", "--train-size", "64", "--hidden", "32", "--depth", "2", "--out", str(tmp_path)]
    summary = example.main(tiny)
    log_dir = Path(summary["log_dir"])
    assert summary["steps"] == 4 and 0.0 <= summary["val_acc"] <= 1.0
    steps = sorted(int(p.stem.split("_")[1]) for p in (log_dir / "cka").glob("step_*.npz"))
    assert steps == [0, 2, 4]
    result = CKAResult.load(log_dir / "cka" / "step_0000004.npz")
    ran = sorted(a.name for a in result.analyses)
    assert ran == sorted(
        ["cka", "attention", "residual", "rank", "localization", "linear_probe"]
    )  # heads: no reference
    major = int(importlib.import_module("transformers").__version__.split(".")[0])
    assert result.layers == (["layers.0", "layers.1"] if major >= 5 else ["layer.0", "layer.1"])
    assert result.mean_attention_distance.shape == (2, 4) and np.isfinite(result.mean_attention_distance).all()
    assert tuple(result.localization_grid) == (8, 8)
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    assert {"cka/intra", "attention/mean_distance", "residual/norm_ratio"} <= set(acc.Tags()["images"])

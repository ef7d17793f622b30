"""``lightning-cka compare`` through ``main([...])``: references that differ, sides with the same run name, and one
run a side (no p-value, nothing marked) against two or more (Welch's t over runs, checked with scipy)."""

import json

import numpy as np
import pytest
import timm
import torch

import lightning_cka.cli.compare as cli_compare
from lightning_cka import CKAResult, compare_models
from lightning_cka.cli import main

TRAINED = {"model": "resnet18_cifar", "weights": "runs/resnet/version_0/checkpoints/last.ckpt", "pretrained": False}
UNTRAINED = {"model": "resnet18_cifar", "weights": None, "pretrained": False}
TRAINED_LABEL = "resnet18_cifar, trained (…/resnet/version_0/last.ckpt)"
UNTRAINED_LABEL = "resnet18_cifar, untrained (random weights)"


@pytest.fixture(scope="module")
def probe():
    torch.manual_seed(0)
    vit, resnet = timm.create_model("test_vit", img_size=32, patch_size=8), timm.create_model("test_resnet")
    return compare_models(vit, resnet, data=torch.randn(16, 3, 32, 32), batch_size=4, analyses=["cka"])


def save_run(folder, probe, reference, label, shift=0.0, steps=(0, 100)):
    """A Lightning log folder whose probes record ``reference`` as CKAMonitor does (settings and label)."""
    settings = {
        **probe.settings_dict(),
        "reference": {**reference, "kwargs": None, "layers": "auto", "reduction": None},
    }
    for step in steps:
        fields = {key: probe.get(key) for key in probe}
        fields |= {"step": step, "settings": json.dumps(settings), "reference_label": label}
        fields |= {"intra": probe.intra - shift, "reference": probe.reference - shift}
        CKAResult(fields, analyses=probe.analyses).save(folder / "cka" / f"step_{step:07d}.npz")
    return folder


def run_cli(*args):
    return main([str(a) for a in args])


@pytest.fixture
def captured(monkeypatch):
    """The comparison figures instead of files."""
    figures = []

    def write(made, out, formats):
        figures.extend(made)
        return [out]

    monkeypatch.setattr(cli_compare, "_write", write)
    return figures


def test_runs_whose_references_differ_are_refused_naming_both(probe, tmp_path, capsys):
    trained = save_run(tmp_path / "trained_ref" / "vit" / "version_0", probe, TRAINED, TRAINED_LABEL)
    untrained = save_run(tmp_path / "untrained_ref" / "vit" / "version_0", probe, UNTRAINED, UNTRAINED_LABEL, 0.3)
    assert run_cli("compare", trained, untrained, "--out", tmp_path / "c.png") == 2
    err = capsys.readouterr().err
    assert "reference models differ" in err and "--allow-different-references" in err
    assert f"{TRAINED_LABEL} in {trained}" in err and f"{UNTRAINED_LABEL} in {untrained}" in err
    assert not (tmp_path / "c.png").exists()


def test_allowed_different_references_are_said_on_every_figure_and_sides_get_distinct_names(
    probe, tmp_path, capsys, captured
):
    trained = save_run(tmp_path / "trained_ref" / "vit" / "version_0", probe, TRAINED, TRAINED_LABEL)
    untrained = save_run(tmp_path / "untrained_ref" / "vit" / "version_0", probe, UNTRAINED, UNTRAINED_LABEL, 0.3)
    assert run_cli("compare", trained, untrained, "--out", tmp_path / "c.png", "--allow-different-references") == 0
    out = capsys.readouterr().out
    assert captured and all("references differ" in figure.caption for figure in captured)
    assert "Caution: the runs' references differ" in out
    # Both runs are vit/version_0: each side takes its parent folder, in the figures and in the table's header.
    assert all(
        figure.title.endswith(": trained_ref/vit/version_0 vs untrained_ref/vit/version_0") for figure in captured
    )
    header = next(line for line in out.splitlines() if line.rstrip().endswith("p"))
    assert "trained_ref/vit/version_0" in header and "untrained_ref/vit/version_0" in header
    # One run a side: no p-value, nothing marked, and the reason.
    rows = [line.split() for line in out.splitlines() if line.startswith("cka/")]
    assert rows and all(row[-1] == "-" for row in rows)
    assert "p: none, one run per side: seed variation unknown, no p-value" in out
    heatmaps = [panel for figure in captured for panel in figure.panels if hasattr(panel, "marked")]
    assert heatmaps and all(panel.marked is None for panel in heatmaps[2::3])


def test_same_reference_passes_and_a_run_against_itself_gets_a_and_b(probe, tmp_path, capsys, captured):
    first = save_run(tmp_path / "x" / "version_0", probe, TRAINED, TRAINED_LABEL)
    assert run_cli("compare", first, first, "--out", tmp_path / "c.png") == 0  # nothing tells them apart
    out = capsys.readouterr().out
    assert "references differ" not in out and not any("references differ" in f.caption for f in captured)
    assert captured[0].title.endswith(": A: x/version_0 vs B: x/version_0")
    assert run_cli("compare", first, first, "--out", tmp_path / "c.png", "--labels", "same", "same") == 2
    assert "two different names" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["vit_mini_patch4-digits", "a_much_longer_experiment_name_than_a_column"])
def test_long_run_names_stay_distinct_in_the_table(probe, tmp_path, capsys, captured, name):
    # The old table cut both 'vit_mini_patch4-digits/version_N' to the same 22 characters.
    a = save_run(tmp_path / name / "version_0", probe, TRAINED, TRAINED_LABEL)
    b = save_run(tmp_path / name / "version_1", probe, TRAINED, TRAINED_LABEL, 0.1)
    assert run_cli("compare", a, b, "--out", tmp_path / "c.png") == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.rstrip().endswith("p"))
    cells = header.split()[:2]
    assert cells[0].endswith("/version_0") and cells[1].endswith("/version_1") and cells[0][:10] == name[:10]
    if len(name) < 30:
        assert cells == [f"{name}/version_0", f"{name}/version_1"]


def test_groups_of_runs_get_welch_over_runs_as_scipy_computes_it(probe, tmp_path, capsys, captured):
    st = pytest.importorskip("scipy.stats")
    from lightning_cka.stats import offdiag_mean

    rng = np.random.default_rng(0)
    sides = {}
    for side, shift in (("a", 0.05), ("b", 0.0)):
        sides[side] = [
            save_run(tmp_path / side / f"seed{i}", probe, TRAINED, TRAINED_LABEL, shift + 0.01 * rng.standard_normal())
            for i in range(3)
        ]
    assert run_cli("compare", *sides["a"], "--vs", *sides["b"], "--out", tmp_path / "c.png") == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("cka/offdiag_mean"))
    values = {
        side: [offdiag_mean(CKAResult.load(run / "cka" / "step_0000100.npz").intra) for run in runs]
        for side, runs in sides.items()
    }
    assert float(row[-1]) == pytest.approx(st.ttest_ind(values["a"], values["b"], equal_var=False).pvalue, abs=5e-4)
    assert "p: Welch's t of A − B, the runs as samples." in out
    assert any(panel.marked is not None for figure in captured for panel in figure.panels if hasattr(panel, "marked"))

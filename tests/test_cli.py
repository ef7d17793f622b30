import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_cka import CKAResult, compare_models
from lightning_cka.cli import main
from lightning_cka.probe_data.images import input_config, probe_images

PNG = b"\x89PNG"
# test_vit made small for speed: 4 x 4 patches of 8 px; local heads lie below half the uniform-attention distance.
SMALL_VIT = '{"img_size": 32, "patch_size": 8}'
VIT_THRESHOLD = "8.0 px"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The models here are tiny: with several threads, their start-up and any competing process cost more than the math.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def probe():
    torch.manual_seed(0)
    vit, resnet = timm.create_model("test_vit", img_size=32, patch_size=8), timm.create_model("test_resnet")
    return compare_models(vit, resnet, data=torch.randn(16, 3, 32, 32), batch_size=4)


def changed(probe, **fields):
    """A copy of the probe with some fields replaced."""
    return CKAResult({**{key: probe.get(key) for key in probe}, **fields})


def make_run(root, probe, steps, shift=0.0, scale=1.0, folder="cka", probe_hash=None):
    """A Lightning log directory as CKAMonitor leaves it: cka/step_<step>.npz."""
    for i, step in enumerate(steps):
        result = changed(
            probe,
            step=step,
            epoch=i,
            intra=probe.intra - shift,
            mean_attention_distance=probe.mean_attention_distance * scale * (1 - 0.2 * i),
            probe_hash=probe_hash or probe.probe_hash,
        )
        result.save(root / folder / f"step_{step:07d}.npz")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, probe):
    root = tmp_path_factory.mktemp("runs")
    small = make_run(root / "small" / "version_0", probe, [0, 100, 200], shift=0.1, scale=0.5)
    big = make_run(root / "big" / "version_0", probe, [0, 100])
    return small, big


def run_cli(*args):
    return main([str(a) for a in args])


def table_rows(text):
    return {line.split()[0]: line.split() for line in text.splitlines() if line[:1].isalpha() and "/" in line[:30]}


def test_compare_draws_a_png_and_prints_the_table_at_the_last_common_step(runs, tmp_path, capsys):
    small, big = runs
    out = tmp_path / "figs" / "compare.png"
    assert run_cli("compare", small, big, "--out", out) == 0
    assert out.read_bytes()[:4] == PNG
    text = capsys.readouterr().out
    assert f"small/version_0: {small} (step 100); 16 probe images" in text
    rows = table_rows(text)
    offdiag = rows["cka/offdiag_mean"]
    assert float(offdiag[-2]) == pytest.approx(-0.1, abs=1e-9)  # A is B minus 0.1 everywhere
    assert offdiag[-1] == "-"  # one run a side: jackknife errors are no test between runs
    assert "p: none, one run per side: seed variation unknown" in text
    distances = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("blocks.")}
    assert float(distances["blocks.0.attn"][-1]) < 0  # half the distances


@pytest.mark.parametrize("existing", [True, False])
def test_compare_into_a_folder_writes_one_file_per_figure_and_names_them(runs, tmp_path, capsys, existing):
    small, big = runs
    out = tmp_path / "panels"
    if existing:
        out.mkdir()
    assert run_cli("compare", small, big, "--out", out, "--format", "png", "svg") == 0
    written = sorted(p.name for p in out.iterdir())
    assert {"cka_intra.png", "cka_intra.svg", "attention_mean_distance.png"} <= set(written)
    assert (out / "cka_intra.png").read_bytes()[:4] == PNG
    said = capsys.readouterr().out.splitlines()[-1]
    assert said.startswith("wrote ") and all(str(out / name) in said for name in written)


def test_compare_refuses_different_probes_unless_allowed(runs, probe, tmp_path, capsys):
    small, _ = runs
    other = make_run(tmp_path / "other", probe, [0, 100], probe_hash="f" * 40)
    assert run_cli("compare", small, other, "--out", tmp_path / "c.png") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "probed different images" in err and "--allow-different-probes" in err
    assert run_cli("compare", small, other, "--out", tmp_path / "c.png", "--allow-different-probes") == 0
    assert "Caution: the runs probed different images" in capsys.readouterr().out


def seeds(root, probe, name, offset, count, noise=0.01):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    made = []
    for seed in range(count):
        intra = probe.intra + offset + noise * rng.standard_normal(probe.intra.shape)
        made.append(make_run(root / name / f"seed{seed}", changed(probe, intra=intra), [0, 50]))
    return made


def test_compare_groups_of_seeds_reports_mean_and_spread_and_the_welch_p(probe, tmp_path, capsys):
    group_a = seeds(tmp_path, probe, "small", -0.05, 3)
    group_b = seeds(tmp_path, probe, "large", 0.0, 3)
    out = tmp_path / "groups.pdf"
    assert run_cli("compare", *group_a, "--vs", *group_b, "--out", out, "--labels", "small", "large") == 0
    assert out.read_bytes()[:4] == b"%PDF"
    text = capsys.readouterr().out
    row = table_rows(text)["cka/offdiag_mean"]
    import scipy.stats as st

    from lightning_cka.stats import offdiag_mean

    a = [offdiag_mean(CKAResult.load(r / "cka" / "step_0000050.npz").intra) for r in group_a]
    b = [offdiag_mean(CKAResult.load(r / "cka" / "step_0000050.npz").intra) for r in group_b]
    assert float(row[-2]) == pytest.approx(np.mean(a) - np.mean(b), abs=5e-4)
    assert float(row[-1]) == pytest.approx(st.ttest_ind(a, b, equal_var=False).pvalue, abs=5e-4)
    assert "± sd over runs" in text


def test_summary_lists_the_probes_and_their_headline_numbers(runs, probe, capsys):
    small, _ = runs
    assert run_cli("summary", small) == 0
    text = capsys.readouterr().out
    assert "steps        0, 100, 200" in text and "16 images, 4 minibatches" in text
    assert "layers       6 (blocks.0, blocks.1, blocks.2, blocks.3, blocks.4, blocks.5)" in text
    assert f"local heads  mean distance below {VIT_THRESHOLD}" in text
    lines = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [int(line[0]) for line in lines] == [0, 100, 200]
    from lightning_cka.stats import jackknife_se, offdiag_mean

    value, se = offdiag_mean(probe.intra - 0.1), jackknife_se(offdiag_mean, probe.intra_replicates)
    step_0 = next(line for line in text.splitlines() if line.split()[:1] == ["0"])
    assert f"{value:.3f} ± {se:.3f}" in step_0
    assert "cka/offdiag_mean" in next(line for line in text.splitlines() if line.split()[:2] == ["step", "epoch"])


def test_summary_of_a_parent_folder_lists_the_runs_below_it(runs, capsys):
    small, big = runs
    assert run_cli("summary", small.parent.parent) == 0
    text = capsys.readouterr().out
    assert "holds no probe arrays itself; the runs below it:" in text
    assert f"{small}  (3 probes)" in text and f"{big}  (2 probes)" in text


def test_a_resumed_run_split_over_two_folders_reads_as_one(probe, tmp_path, capsys):
    first = make_run(tmp_path / "vit" / "version_0", probe, [0, 100])
    second = make_run(tmp_path / "vit" / "version_1", probe, [200, 300])
    assert run_cli("summary", first, second) == 0
    assert "steps        0, 100, 200, 300" in capsys.readouterr().out
    assert run_cli("compare", f"{first},{second}", second, "--out", tmp_path / "c.png") == 0
    assert "(step 300)" in capsys.readouterr().out


def test_unreadable_probe_files_are_skipped_with_one_line_each(probe, tmp_path, capsys):
    run = make_run(tmp_path / "run", probe, [0, 10])
    (run / "cka" / "step_0000020.npz").write_bytes(b"")  # a kill left it empty
    (run / "cka" / "step_0000030.npz").write_bytes(b"PK\x03\x04 cut short")
    (run / "cka" / ".step_0000040.npz.123.tmp").write_bytes(b"half")  # an interrupted atomic write: not a probe
    assert run_cli("summary", run) == 0
    out, err = capsys.readouterr()
    assert "steps        0, 10" in out
    lines = err.splitlines()
    assert len(lines) == 2 and "step_0000020.npz" in lines[0] and "step_0000030.npz" in lines[1] and ".tmp" not in err


def test_plot_writes_every_figure_of_a_probe_in_print_formats(runs, tmp_path, capsys):
    small, _ = runs
    out = tmp_path / "figures"
    assert run_cli("plot", small, "--step", 100, "--out", out, "--format", "png", "pdf", "svg", "--dpi", 50) == 0
    names = sorted(p.name for p in out.iterdir())
    for stem in ("cka_intra", "cka_reference", "cka_intra_change", "attention_mean_distance"):
        assert {f"{stem}.png", f"{stem}.pdf", f"{stem}.svg"} <= set(names), stem
    assert (out / "cka_intra.pdf").read_bytes()[:4] == b"%PDF" and "<svg" in (out / "cka_intra.svg").read_text()
    assert "step 100 of" in capsys.readouterr().out


def test_export_writes_the_dashboard_data_of_an_old_run(runs, tmp_path, capsys):
    small, _ = runs
    assert run_cli("export", small) == 0
    acc = EventAccumulator(str(small), size_guidance={"tensors": 0})
    acc.Reload()
    assert "cka/intra/figure" in acc.Tags()["tensors"]
    assert [e.step for e in acc.Tensors("cka/intra/figure")] == [0, 100, 200]
    assert "tensorboard --logdir" in capsys.readouterr().out


def test_analyze_writes_a_run_that_compare_and_summary_read(tmp_path, capsys):
    out = tmp_path / "analysis"
    args = ["analyze", "--model", "test_vit", "--model-kwargs", SMALL_VIT, "--reference", "test_resnet"]
    args += ["--data", "random", "--out", out]
    assert run_cli(*args, "--num-examples", 12, "--batch-size", 6) == 0
    for name in ("cka_intra.png", "cka_reference.png", "cka_reference_intra.png", "attention_mean_distance.png"):
        assert (out / name).read_bytes()[:4] == PNG
    result = CKAResult.load(out / "cka" / "analysis.npz")
    assert result.intra.shape == (6, 6) and result.reference.shape == (6, 4) and result.num_examples == 12
    assert result.mean_attention_distance.shape == (6, 2) and result.step == -1
    assert result.uniform_attention_distance == pytest.approx(16.0, abs=0.1)  # twice the 8 px threshold
    assert f"below {VIT_THRESHOLD}" in capsys.readouterr().out
    assert run_cli("summary", out) == 0
    assert "steps        -1 (-1: not from training)" in capsys.readouterr().out


def test_analyze_on_a_npz_of_uint8_images(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 24, 24, 3), dtype=np.uint8)
    np.savez(tmp_path / "cifar.npz", x_train=images[:2], x_test=images)
    out = tmp_path / "out"
    args = ["analyze", "--model", "test_resnet", "--reference", "test_vit", "--reference-kwargs", SMALL_VIT]
    assert run_cli(*args, "--data", tmp_path / "cifar.npz", "--image-size", 32, "--out", out) == 0
    result = CKAResult.load(out / "cka" / "analysis.npz")
    assert result.num_examples == 10 and result.intra.shape == (4, 4) and result.mean_attention_distance is None
    assert result.reference_mean_attention_distance.shape == (6, 2)
    assert (out / "attention_reference_mean_distance.png").exists()
    assert not (out / "attention_mean_distance.png").exists()


def test_analyze_on_an_image_folder_uses_its_val_split(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 1), ("val", 4)):
        for label in ("cat", "dog"):
            (tmp_path / "images" / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "images" / split / label / f"{i}.png")
    out = tmp_path / "out"
    args = ["analyze", "--model", "test_vit", "--model-kwargs", SMALL_VIT, "--data", tmp_path / "images"]
    args += ["--out", out, "--batch-size", 4]
    assert run_cli(*args) == 0
    assert CKAResult.load(out / "cka" / "analysis.npz").num_examples == 8


def test_analyze_a_lightning_checkpoint_on_digits(tmp_path, capsys):
    torch.manual_seed(1)
    vit = timm.create_model("test_vit", num_classes=3, img_size=32, patch_size=8)
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in vit.state_dict().items()},
        "hyper_parameters": {
            "timm_name": "test_vit",
            "timm_kwargs": {"num_classes": 3, "img_size": 32, "patch_size": 8},
        },
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    out = tmp_path / "out"
    assert (
        run_cli("analyze", "--model", tmp_path / "last.ckpt", "--data", "digits", "--num-examples", 12, "--out", out)
        == 0
    )
    result = CKAResult.load(out / "cka" / "analysis.npz")
    assert result.num_examples == 12 and result.reference is None and not (out / "cka_reference.png").exists()
    assert "12 of the 1797 images of scikit-learn digits" in capsys.readouterr().out


def test_probe_images_are_resized_and_normalized():
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.5)
    probe = probe_images("digits", 10, (40, 40), mean, std, batch_size=4)
    batches = list(probe.batches)
    assert [b.shape for b in batches] == [(4, 3, 40, 40), (6, 3, 40, 40)]  # a last minibatch of 2 joins the one before
    images = torch.cat(batches)
    assert images.min() == -1 and images.max() <= 1 and torch.equal(images[:, 0], images[:, 2])


def test_input_size_is_the_vit_s_own_and_normalization_can_be_overridden():
    vit = timm.create_model("test_vit", img_size=32, patch_size=8)  # its pretrained_cfg still says 160
    size, mean, std = input_config(vit)
    assert size == (32, 32) and mean.flatten().tolist() == [0.5] * 3 and std.shape == (1, 3, 1, 1)
    size, mean, _ = input_config(timm.create_model("test_resnet"), image_size=48, mean=[0.1, 0.2, 0.3])
    assert size == (48, 48) and mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_help_of_every_command(capsys):
    assert run_cli("--help") == 0
    for command in ("compare", "analyze", "summary", "plot", "export"):
        assert run_cli(command, "--help") == 0
    assert "--reference-layers" in capsys.readouterr().out
    assert run_cli() == 2  # a command is required
    assert run_cli("compare", "a", "b", "--out", "x.png", "--step", "latest") == 2


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, probe):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("hi")
    np.savez(root / "other.npz", weights=np.zeros(3))
    np.savez(root / "floats.npz", x=np.zeros((4, 8, 8, 3), dtype=np.float32))
    np.savez(root / "three.npz", images=np.zeros((3, 8, 8, 3), dtype=np.uint8))
    make_run(root / "analyzed", probe, [-1])
    renamed = changed(probe, layers=[f"stage.{i}" for i in range(6)], step=100)
    renamed.save(root / "renamed" / "cka" / "step_0000100.npz")
    make_run(root / "two", probe, [0], folder="cka/first")
    make_run(root / "two", probe, [0], folder="cka/second")
    return root


ERRORS = {
    "missing": (["summary", "{root}/nowhere"], "nowhere does not exist"),
    "no arrays": (["summary", "{root}/empty"], "holds no probe arrays"),
    "not npz": (["summary", "{root}/notes.txt"], "is not a .npz file"),
    "not probe arrays": (["summary", "{root}/other.npz"], "holds no readable probe files"),
    "two monitors": (["summary", "{root}/two"], "several named monitors (first, second)"),
    "fraction": (["summary", "{small}", "--local-threshold", "2"], "--local-threshold is a fraction in (0, 1], got 2"),
    "step missing": (["compare", "{small}", "{big}", "--step", "200", "--out", "{root}/c.png"], "step 200 is not in"),
    "one run": (["compare", "{small}", "--out", "{root}/c.png"], "give two runs (A B), or side B after --vs"),
    "plot step": (["plot", "{small}", "--step", "7", "--out", "{root}/p"], "step 7 is not in"),
    "plot dpi": (["plot", "{small}", "--dpi", "1", "--out", "{root}/p"], "--dpi must be between 10 and 1200"),
    "plot dpi huge": (["plot", "{small}", "--dpi", "100000", "--out", "{root}/p"], "--dpi must be between 10 and 1200"),
    "no saved probe": (["analyze", "--model", "test_vit", "--out", "{root}/o"], "no --data given"),
    "no common step": (["compare", "{small}", "{root}/analyzed", "--out", "{root}/c.png"], "no step in common"),
    "layers": (["compare", "{small}", "{root}/renamed", "--out", "{root}/c.png"], "monitor different layers"),
    "format": (["compare", "{small}", "{big}", "--out", "{root}/c.unknown"], "a figure file ends in .png, .pdf or"),
    "model": (["analyze", "--model", "no_such_net", "--data", "random", "--out", "{root}/o"], "neither a file"),
    "data": (["analyze", "--model", "test_vit", "--data", "cifar", "--out", "{root}/o"], "not 'random', 'digits'"),
    "npz keys": (["analyze", "--model", "test_vit", "--data", "{root}/other.npz", "--out", "{root}/o"], "none of"),
    "npz dtype": (["analyze", "--model", "test_vit", "--data", "{root}/floats.npz", "--out", "{root}/o"], "uint8"),
    "too few": (
        ["analyze", "--model", "test_vit", "--data", "random", "--num-examples", "3", "--out", "{root}/o"],
        "--num-examples must be at least 4, got 3",
    ),
    "tiny npz": (["analyze", "--model", "test_vit", "--data", "{root}/three.npz", "--out", "{root}/o"], "at least 4"),
    "batch": (["analyze", "--model", "test_vit", "--data", "random", "--batch-size", "2", "--out", "{root}/o"], "4"),
    "out": (["analyze", "--model", "test_resnet", "--data", "random", "--out", "{root}/notes.txt"], "cannot write"),
    "kwargs": (
        [
            "analyze",
            "--model",
            "test_vit",
            "--model-kwargs",
            '{"depth_typo": 1}',
            "--data",
            "random",
            "--out",
            "{root}/o",
        ],
        "--model test_vit",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_with_exit_status_2(case, bad_inputs, runs, capsys):
    args, message = ERRORS[case]
    small, big = runs
    args = [
        a.replace("{root}", str(bad_inputs)).replace("{small}", str(small)).replace("{big}", str(big)) for a in args
    ]
    if args[0] == "analyze" and "--num-examples" not in args:
        args += ["--num-examples", "8"]  # the cases that get as far as running the model stay fast
    assert run_cli(*args) == 2
    out, err = capsys.readouterr()
    assert out == "" or args[0] == "analyze"  # analyze says what it probes before the model runs
    assert err.startswith("lightning-cka: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err


def test_digits_without_scikit_learn_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert run_cli("analyze", "--model", "test_vit", "--data", "digits", "--out", tmp_path) == 2
    assert "needs scikit-learn: pip install 'lightning-cka[examples]'" in capsys.readouterr().err


def test_the_installed_console_script_exits_with_status_2_and_one_line(runs, tmp_path):
    script = Path(sys.executable).with_name("lightning-cka")
    if not script.exists():
        pytest.skip("the lightning-cka console script is not installed: pip install -e .")
    small, big = runs
    args = [script, "compare", small, big, "--step", "200", "--out", tmp_path / "c.png"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"lightning-cka: error: step 200 is not in {big} (its steps: 0, 100).\n"

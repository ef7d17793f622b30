import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from lightning_cka import CKAResult, compare_models
from lightning_cka.cli import main
from lightning_cka.cli.probe_images import input_config, probe_images

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
    return compare_models(vit, resnet, data=torch.randn(8, 3, 32, 32), batch_size=8)


def make_run(root, probe, steps, shift=0.0, scale=1.0, folder="cka"):
    """A Lightning log directory as CKAMonitor leaves it: cka/step_<step>.npz."""
    for i, step in enumerate(steps):
        result = dataclasses.replace(
            probe,
            step=step,
            epoch=i,
            intra=probe.intra - shift,
            mean_attention_distance=probe.mean_attention_distance * scale * (1 - 0.2 * i),
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


def test_compare_draws_a_png_and_prints_the_table_at_the_last_common_step(runs, tmp_path, capsys):
    small, big = runs
    out = tmp_path / "figs" / "compare.png"
    assert run_cli("compare", small, big, "--out", out) == 0
    assert out.read_bytes()[:4] == PNG
    text = capsys.readouterr().out
    assert f"A = small/version_0: {small}, step 100, 8 probe images" in text
    assert f"B = big/version_0: {big}, step 100" in text
    assert f"local heads: mean distance below {VIT_THRESHOLD}" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("blocks.")}
    assert rows["blocks.0"][1] == "-0.100"  # A is B minus 0.1 everywhere
    assert len(rows["blocks.0.attn"]) == 7  # mean, min and local fraction of A and B
    assert float(rows["blocks.0.attn"][1]) == pytest.approx(0.5 * float(rows["blocks.0.attn"][4]), abs=0.1)


def test_compare_at_a_given_step_with_labels(runs, tmp_path, capsys):
    small, big = runs
    assert run_cli("compare", small, big, "--step", 0, "--out", tmp_path / "c.png", "--labels", "1%", "100%") == 0
    text = capsys.readouterr().out
    assert "A = 1%: " in text and "step 0, 8 probe images" in text


def test_a_npz_file_is_its_probe_whatever_the_step(runs, tmp_path, capsys):
    small, big = runs
    assert run_cli("compare", small / "cka" / "step_0000200.npz", big, "--out", tmp_path / "c.png") == 0
    text = capsys.readouterr().out
    assert "step 200," in text and f"{big}, step 100" in text


def test_summary_lists_the_probes_and_their_headline_numbers(runs, probe, capsys):
    small, _ = runs
    assert run_cli("summary", small) == 0
    lines = capsys.readouterr().out.splitlines()
    text = "\n".join(lines)
    assert "steps        0, 100, 200" in text and "epochs       0, 1, 2" in text and "examples     8" in text
    assert "layers       6 (blocks.0, " in text and "reference    4 (layer1.0, " in text and "2 heads" in text
    assert f"below {VIT_THRESHOLD}" in text
    rows = [line.split() for line in lines if line.split()[:1] in (["0"], ["100"], ["200"])]
    assert [row[:2] for row in rows] == [["0", "0"], ["100", "1"], ["200", "2"]]
    # Step 0 of the small run holds intra - 0.1 and half the distances (make_run); its numbers, computed directly:
    intra, off_diagonal = probe.intra - 0.1, ~np.eye(len(probe.intra), dtype=bool)
    expected = [intra[off_diagonal].mean(), np.diagonal(intra, offset=1).mean(), probe.reference.max(axis=1).mean()]
    first_layer = probe.mean_attention_distance[0] / 2
    assert np.isfinite(probe.reference).all() and np.isfinite(first_layer).all()
    assert rows[0][2:6] == [f"{v:.3f}" for v in expected] + [f"{first_layer.mean():.1f}"]


def test_summary_reads_the_cka_folder_a_named_monitor_and_the_threshold_fraction(tmp_path, probe, capsys):
    run = make_run(tmp_path / "run", probe, [5], folder="cka/vit")
    assert run_cli("summary", run / "cka") == 0
    assert f"below {VIT_THRESHOLD}" in capsys.readouterr().out
    assert run_cli("summary", run, "--local-threshold", 0.25) == 0
    assert "below 4.0 px" in capsys.readouterr().out
    # Arrays from before the uniform-attention distance was saved have no threshold, and say so.
    dataclasses.replace(probe, uniform_attention_distance=float("nan")).save(run / "cka" / "vit" / "step_0000005.npz")
    assert run_cli("summary", run) == 0
    text = capsys.readouterr().out
    assert "local heads  none (" in text and text.rstrip().endswith("-")  # the local column is blank


def test_analyze_writes_a_run_that_compare_and_summary_read(tmp_path, capsys):
    out = tmp_path / "analysis"
    args = ["analyze", "--model", "test_vit", "--model-kwargs", SMALL_VIT, "--reference", "test_resnet"]
    args += ["--data", "random", "--out", out]
    assert run_cli(*args, "--num-examples", 12, "--batch-size", 6) == 0
    for name in ("cka_intra.png", "cka_reference.png", "cka_reference_intra.png", "attention_distance.png"):
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
    assert result.num_examples == 10 and result.intra.shape == (4, 4) and result.mean_attention_distance.size == 0
    assert result.reference_mean_attention_distance.shape == (6, 2)
    assert (out / "attention_distance_reference.png").exists() and not (out / "attention_distance.png").exists()


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
    assert result.num_examples == 12 and result.reference.size == 0 and not (out / "cka_reference.png").exists()
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
    for command in ("compare", "analyze", "summary"):
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
    renamed = dataclasses.replace(probe, layers=[f"stage.{i}" for i in range(6)], step=100)
    renamed.save(root / "renamed" / "cka" / "step_0000100.npz")
    make_run(root / "two", probe, [0], folder="cka/first")
    make_run(root / "two", probe, [0], folder="cka/second")
    return root


ERRORS = {
    "missing": (["summary", "{root}/nowhere"], "nowhere does not exist"),
    "no arrays": (["summary", "{root}/empty"], "holds no probe arrays"),
    "not npz": (["summary", "{root}/notes.txt"], "is not a .npz file"),
    "not probe arrays": (["summary", "{root}/other.npz"], "cannot read"),
    "two monitors": (["summary", "{root}/two"], "several named monitors (first, second)"),
    "fraction": (["summary", "{small}", "--local-threshold", "2"], "--local-threshold is a fraction in (0, 1], got 2"),
    "step missing": (["compare", "{small}", "{big}", "--step", "200", "--out", "{root}/c.png"], "step 200 is not in"),
    "no common step": (["compare", "{small}", "{root}/analyzed", "--out", "{root}/c.png"], "no step in common"),
    "layers": (["compare", "{small}", "{root}/renamed", "--out", "{root}/c.png"], "monitor different layers"),
    "format": (["compare", "{small}", "{big}", "--out", "{root}/c.unknown"], "cannot write --out"),
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
    "size": (["analyze", "--model", "test_vit", "--data", "random", "--image-size", "64", "--out", "{root}/o"], "fail"),
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

"""The README's thesis path, run as written (each command in its folder, on tiny sizes): every command must find what
the one before it wrote, and the ViT must be compared with the CNN trained in step 1, not with an untrained one."""

import importlib
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_cka.cli import main as lightning_cka

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "examples"))

# Appended to every training command of the path: later flags win, so the models and names stay the README's.
TINY = ["--max-steps", "4", "--val-every", "2", "--cka-every", "2", "--probe-size", "16", "--cka-batch-size", "8"]
TINY += ["--batch-size", "16", "--no-images"]


def thesis_path() -> list[list[str]]:
    """The commands of the README's thesis section, comments removed."""
    section = (ROOT / "README.md").read_text().split("### A thesis", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def run(command: list[str]) -> None:
    if command[0] == "lightning-cka":
        assert lightning_cka(command[1:]) == 0, command
        return
    assert command[0] == "python" and command[1].startswith("examples/"), command
    script = importlib.import_module(Path(command[1]).stem)
    script.main([*command[2:], *TINY, *(["--train-size", "64"] if script.__name__ == "train" else [])])


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_thesis_path_runs_as_written_and_compares_with_the_trained_cnn(tmp_path, monkeypatch, one_thread):
    commands = thesis_path()
    assert [c[:2] for c in commands] == [
        ["python", "examples/train.py"],
        ["python", "examples/train.py"],
        ["lightning-cka", "plot"],
        ["lightning-cka", "report"],
        ["python", "examples/small_vs_large.py"],
    ]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "vit_mini_patch4-digits" / "version_0").mkdir(parents=True)  # the set-up demo's run
    for command in commands:
        run(command)

    cnn, vit = tmp_path / "runs" / "thesis-cnn" / "version_0", tmp_path / "runs" / "thesis-vit" / "version_0"
    checkpoint = torch.load(cnn / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4  # step 1 trained the CNN before step 2 read it
    with np.load(sorted((vit / "cka").glob("step_*.npz"))[-1]) as probe:
        label = str(probe["reference_label"])
    assert re.search(r"\btrained \(.*thesis-cnn/version_0/.*last\.ckpt", label), label  # not "untrained"
    assert (tmp_path / "figures" / "figure_1.pdf").stat().st_size > 0
    assert (tmp_path / "figures" / "figure_1.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.html").stat().st_size > 0
    assert "thesis-cnn" in report and re.search(r"\b(shows|does not show|partly|cannot tell)\b", report)
    groups = tmp_path / "runs" / "small_vs_large"
    assert {p.name for p in groups.iterdir() if p.is_dir()} >= {
        f"{s}-seed{k}" for s in ("small", "large") for k in (0, 1, 2)
    }
    assert (groups / "report.html").stat().st_size > 0
    with np.load(sorted((groups / "large-seed2" / "version_0" / "cka").glob("step_*.npz"))[-1]) as probe:
        assert re.search(r"\btrained \(.*thesis-cnn", str(probe["reference_label"]))  # the same trained CNN

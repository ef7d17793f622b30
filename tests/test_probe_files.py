"""Probe files are checked against what their analyses declare before anything reads them: a bad file is skipped with
one line naming it and the field, or is an error (exit 2) where it is the only input; nothing is allocated before its
size is checked against the file.
"""

import io
import json
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import timm
import torch

from lightning_cka import CKAResult, compare_models
from lightning_cka.analyses import LayerCKA
from lightning_cka.cli import main


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real probe file of a 6-block ViT (steps 3 and 6 of a run)."""
    torch.manual_seed(0)
    result = compare_models(timm.create_model("test_vit"), data=torch.randn(16, 3, 160, 160), batch_size=8)
    root = tmp_path_factory.mktemp("good")
    for step in (3, 6):
        result.step = step
        result.save(root / "run" / "cka" / f"step_{step:07d}.npz")
    return root / "run"


def arrays_of(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def with_changes(good, tmp_path, **changes):
    """A copy of the run whose step-6 file has some arrays replaced (None: removed)."""
    arrays = arrays_of(good / "cka" / "step_0000006.npz")
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    run = tmp_path / "run"
    (run / "cka").mkdir(parents=True)
    (run / "cka" / "step_0000003.npz").write_bytes((good / "cka" / "step_0000003.npz").read_bytes())
    np.savez(run / "cka" / "step_0000006.npz", **arrays)
    return run


BAD = {
    "intra 5x5 beside 6 layers": ({"intra": np.eye(5)}, r"field 'intra' has shape \(5, 5\), but axis 0 should be 6"),
    "a 1-D intra": ({"intra": np.ones(6)}, r"field 'intra' has shape \(6,\); it should have 2 dims"),
    "step as an array": ({"step": np.arange(3)}, r"field 'step' is one number, not an array of shape \(3,\)"),
    "integer layer names": ({"layers": np.arange(6)}, r"field 'layers' holds int64 values, not text"),
    "attention distances of 3 layers": (
        {"mean_attention_distance": np.ones((3, 2))},
        r"field 'mean_attention_distance' has shape \(3, 2\), but axis 0 should be 6, the length of 'attention_layers'",
    ),
    "replicates of another length": (
        {"intra_replicates": np.ones((5, 6, 6))},
        r"field 'intra_replicates' has shape \(5, 6, 6\), but axis 0 should be 2, the value of 'num_minibatches'",
    ),
    "no layers": ({"layers": None}, r"not a lightning-cka probe file"),
    "layers of the heads' rows disagree": (
        {"attention_entropy": np.ones((6, 3))},
        r"field 'attention_entropy' has shape \(6, 3\), but axis 1 should be 2, as 'H' elsewhere",
    ),
    "text in a number field": ({"num_minibatches": np.asarray("two")}, r"field 'num_minibatches' holds <U3"),
    "a garbled analyses record": ({"analyses": np.asarray("[3]")}, r"field 'analyses' is not a list"),
}


@pytest.mark.parametrize(("changes", "message"), list(BAD.values()), ids=list(BAD))
def test_a_file_that_disagrees_with_its_declarations_is_refused_naming_the_field(good, tmp_path, changes, message):
    run = with_changes(good, tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        CKAResult.load(run / "cka" / "step_0000006.npz")


@pytest.mark.parametrize("command", ["summary", "plot", "export"])
def test_the_cli_skips_a_bad_file_with_one_line_and_reads_the_others(good, tmp_path, capsys, command):
    run = with_changes(good, tmp_path, intra=np.eye(5))
    extra = {"plot": ["--out", str(tmp_path / "figures"), "--step", "3"], "export": ["--logdir", str(tmp_path / "tb")]}
    assert main([command, str(run), *extra.get(command, [])]) == 0
    err = capsys.readouterr().err
    assert err.count("lightning-cka: warning: skipped") == 1
    assert "step_0000006.npz: field 'intra' has shape (5, 5)" in err


def test_the_cli_exits_2_naming_the_file_and_the_field_when_it_is_the_only_input(good, tmp_path, capsys):
    run = with_changes(good, tmp_path, intra=np.eye(5))
    single = run / "cka" / "step_0000006.npz"
    for command in (["summary", str(single)], ["plot", str(single), "--out", str(tmp_path / "f")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("lightning-cka: error:") and err.count("\n") == 1
        assert "step_0000006.npz: field 'intra' has shape (5, 5)" in err
    other = with_changes(good, tmp_path / "other", intra=np.eye(5))
    assert main(["compare", str(single), str(other / "cka" / "step_0000006.npz"), "--out", str(tmp_path / "c.png")])
    assert "field 'intra'" in capsys.readouterr().err


def npy_header(shape, dtype="<f8"):
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (63 - len(header) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()


def test_a_tiny_file_declaring_a_huge_array_is_refused_before_allocating(tmp_path):
    names = io.BytesIO()
    np.save(names, np.array(["a", "b"]))
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("layers.npy", names.getvalue())
        archive.writestr("intra.npy", npy_header((1_000_000, 1_000_000)))  # 8 TB declared, none held
    assert path.stat().st_size < 600
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"member 'intra.npy' declares a float64 array of shape \(1000000, 1000000\)"):
        CKAResult.load(path)
    assert time.perf_counter() - start < 1.0


def test_pickles_are_never_read(tmp_path):
    path = tmp_path / "pickle.npz"
    np.savez(path, layers=np.array(["a"]), intra=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="holds Python objects"):
        CKAResult.load(path)


def test_files_of_every_format_still_load(good, tmp_path):
    # Format 3 (this version) records its analyses; format 2 has settings and no record; format 1 has neither.
    current = CKAResult.load(good / "cka" / "step_0000006.npz")
    assert [a.name for a in current.analyses] == ["cka", "attention", "residual", "rank"]  # no reference: no heads
    arrays = arrays_of(good / "cka" / "step_0000006.npz")
    arrays.pop("analyses")
    arrays["format_version"] = np.asarray(2)
    arrays["settings"] = np.asarray(json.dumps({"options": {"permutations": 39}, "local_threshold": 0.3}))
    np.savez(tmp_path / "v2.npz", **arrays)
    v2 = CKAResult.load(tmp_path / "v2.npz")
    np.testing.assert_array_equal(v2.intra, current.intra)
    assert v2.analysis("cka").permutations == 39 and v2.analysis("attention").local_threshold == 0.3
    np.savez(tmp_path / "v1.npz", layers=np.array(["a", "b"]), intra=np.eye(2), reference=np.zeros(0))
    v1 = CKAResult.load(tmp_path / "v1.npz")
    assert v1.layers == ["a", "b"] and v1.reference is None


def test_a_file_of_a_newer_format_says_to_upgrade(good, tmp_path):
    arrays = arrays_of(good / "cka" / "step_0000006.npz")
    arrays["format_version"] = np.asarray(99)
    np.savez(tmp_path / "new.npz", **arrays)
    with pytest.raises(ValueError, match=r"newer lightning-cka.*upgrade"):
        CKAResult.load(tmp_path / "new.npz")


def test_reading_a_result_and_summarizing_a_run_import_neither_torch_nor_timm(good):
    code = (
        "import sys\n"
        "import lightning_cka.result\n"
        f"lightning_cka.result.CKAResult.load({str(good / 'cka' / 'step_0000006.npz')!r}).scalars()\n"
        "from lightning_cka.cli import main\n"
        f"assert main(['summary', {str(good)!r}]) == 0\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision', 'torchmetrics', 'pytorch_lightning') if m in "
        "sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out


def test_a_file_saved_with_fewer_analyses_knows_only_theirs(tmp_path):
    torch.manual_seed(0)
    result = compare_models(
        timm.create_model("test_resnet"), data=torch.randn(8, 3, 64, 64), batch_size=8, analyses=[LayerCKA()]
    )
    result.save(tmp_path / "a.npz")
    loaded = CKAResult.load(tmp_path / "a.npz")
    assert [a.name for a in loaded.analyses] == ["cka"] and loaded.mean_attention_distance is None
    assert [f.tag for f in loaded.figures()] == ["cka/intra"]

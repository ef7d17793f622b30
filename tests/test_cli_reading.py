"""Reading runs fast: plot reads only what it draws, and the fast .npz reader equals np.load on every layout."""

import io
import zipfile

import numpy as np
import pytest
import timm
import torch

from lightning_cka import CKAResult, compare_models
from lightning_cka.analyses import LayerCKA
from lightning_cka.cli import main
from lightning_cka.probe_file import read_arrays


@pytest.fixture(scope="module")
def probe():
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", img_size=32, patch_size=8)
    return compare_models(vit, data=torch.randn(8, 3, 32, 32), batch_size=4, analyses=["cka"])


@pytest.fixture
def run(tmp_path, probe):
    folder = tmp_path / "run" / "cka"
    for i in range(5):
        values = {key: probe.get(key) for key in probe}
        CKAResult({**values, "step": 100 * i, "epoch": i}, analyses=probe.analyses).save(
            folder / f"step_{100 * i:07d}.npz"
        )
    return folder


@pytest.fixture
def loads(monkeypatch):
    """The files CKAResult.load reads."""
    seen = []
    original = CKAResult.load.__func__

    def load(cls, path):
        seen.append(path.name)
        return original(cls, path)

    monkeypatch.setattr(CKAResult, "load", classmethod(load))
    return seen


def test_plot_reads_the_probe_it_draws_and_the_one_before_only(run, tmp_path, loads, capsys):
    for step in (0, 100):  # damaged files elsewhere in the run: reported from their headers, never loaded
        (run / f"step_{step:07d}.npz").write_bytes(b"not a zip")
    assert main(["plot", str(run.parent), "--step", "400", "--out", str(tmp_path / "figs")]) == 0
    assert sorted(loads) == ["step_0000300.npz", "step_0000400.npz"]
    err = capsys.readouterr().err
    assert err.count("skipped") == 2 and "step_0000000.npz" in err and "step_0000100.npz" in err
    loads.clear()
    assert main(["plot", str(run.parent), "--out", str(tmp_path / "last")]) == 0  # the default: the last step
    assert sorted(loads) == ["step_0000300.npz", "step_0000400.npz"]


def test_checking_a_file_reads_no_large_array(tmp_path, monkeypatch):
    layers = [f"blocks.{i}" for i in range(40)]
    intra = np.random.default_rng(0).random((40, 40))  # 12.8 kB of numbers
    path = CKAResult({"layers": layers, "intra": intra, "step": 3}, analyses=[LayerCKA()]).save(tmp_path / "p.npz")
    decoded = []
    original = np.frombuffer
    monkeypatch.setattr(
        np, "frombuffer", lambda data, dtype: decoded.append((len(data), np.dtype(dtype).kind)) or original(data, dtype)
    )
    CKAResult.check(path)
    numbers = [size for size, kind in decoded if kind in "biuf"]
    assert numbers and max(numbers) <= 4096  # names and texts, and numbers only as small as a layer list's
    decoded.clear()
    CKAResult.load(path)
    assert max(size for size, kind in decoded if kind in "biuf") > 4096


def test_plot_steps_over_an_unreadable_previous_probe_with_a_warning(run, tmp_path, loads, capsys):
    (run / "step_0000300.npz").write_bytes(b"cut short")
    assert main(["plot", str(run.parent), "--out", str(tmp_path / "figs")]) == 0
    assert loads == ["step_0000400.npz", "step_0000300.npz", "step_0000200.npz"]
    assert capsys.readouterr().err.count("skipped") == 1


def test_summary_still_reads_every_probe(run, loads, capsys):
    assert main(["summary", str(run.parent)]) == 0
    assert len(loads) == 5 and "   400 " in capsys.readouterr().out


def npz(arrays, compressed=False):
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("compressed", [False, True])
def test_the_fast_reader_equals_np_load_on_every_layout(tmp_path, compressed):
    rng = np.random.default_rng(0)
    arrays = {
        "c_order": rng.random((3, 4)),
        "fortran": np.asfortranarray(rng.random((3, 4, 2))),
        "scalar": np.asarray(2.5),
        "ints": np.arange(7, dtype=np.int64),
        "names": np.asarray(["blocks.0", "blocks.10"]),
        "empty": np.zeros((0, 3)),
        "big_endian": np.arange(4, dtype=">f4"),
    }
    path = tmp_path / "probe.npz"
    path.write_bytes(npz(arrays, compressed))
    read, expected = read_arrays(path), dict(np.load(path))
    assert read.keys() == expected.keys()
    for key, value in expected.items():
        assert read[key].dtype == value.dtype and read[key].shape == value.shape, key
        np.testing.assert_array_equal(read[key], value)
        read[key].flags.writeable or pytest.fail(f"{key} is read-only")


def test_a_header_numpy_writes_otherwise_is_read_by_numpy_s_parser(tmp_path):
    body = np.arange(6, dtype="<f8").tobytes()
    header = b"{'shape': (2, 3), 'fortran_order': False, 'descr': '<f8'}"  # keys in another order
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    member = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + body
    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", member)
    np.testing.assert_array_equal(read_arrays(path)["x"], np.arange(6.0).reshape(2, 3))


def test_a_corrupt_member_is_refused(tmp_path):
    path = tmp_path / "probe.npz"
    raw = bytearray(npz({"x": np.arange(100.0)}))
    raw[200] ^= 0xFF  # a flipped byte in the data: the CRC says so
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="cut short or corrupt"):
        read_arrays(path)

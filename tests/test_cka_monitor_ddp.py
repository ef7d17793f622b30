"""CKAMonitor under DDP: two gloo processes write what one process writes, and a failure on rank 1 is reported."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from lit_helpers import array_steps

from lightning_cka import CKAResult

HERE = Path(__file__).parent


def start(out, devices, *extra):
    return subprocess.Popen(
        [sys.executable, str(HERE / "ddp_fit.py"), "--devices", str(devices), "--out", str(out), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )


def test_ddp_two_processes_write_the_same_arrays_as_one_and_report_a_failure_on_rank_1(tmp_path):
    # Both fits at once: the one-process fit leaves a core idle while the other starts its two processes.
    procs = {devices: start(tmp_path / f"devices{devices}", devices) for devices in (1, 2)}
    outputs = {devices: proc.communicate(timeout=300)[1] for devices, proc in procs.items()}
    for devices, proc in procs.items():
        assert proc.returncode == 0, outputs[devices][-3000:]
    # Said once, by rank 0 (Lightning's rank_zero_warn), not once per rank or per probe.
    assert outputs[2].count("the probe at step 4 failed") == 1
    assert outputs[2].count("default analyses that do not apply") <= 1
    single, double = tmp_path / "devices1" / "run", tmp_path / "devices2" / "run"
    assert [p.name for p in double.iterdir()] == ["version_0"]  # one set of files
    assert array_steps(single / "version_0") == [0, 2, 4, 6]
    assert array_steps(double / "version_0") == [0, 2, 6]  # rank 1 failed at step 4: every rank skipped it
    assert "probe at step 4 failed (rank 1: RuntimeError: rank 1 fails at step 4)" in outputs[2]
    for step in (0, 2, 6):
        a = CKAResult.load(single / "version_0" / "cka" / f"step_{step:07d}.npz")
        b = CKAResult.load(double / "version_0" / "cka" / f"step_{step:07d}.npz")
        assert a.layers == b.layers and a.reference_layers == b.reference_layers and b.num_examples == 40
        assert b.minibatch_sizes.tolist() == [8, 8, 8, 8, 8]  # 5 minibatches: the ranks have 3 and 2
        keys = [k for k in a if isinstance(a.get(k), np.ndarray) and a.get(k).dtype.kind == "f"]
        assert {"intra", "intra_se", "intra_null", "reference", "reference_null", "mean_attention_distance"} <= set(
            keys
        )
        # summed over ranks too: the shuffled-label probes (seeded by the global minibatch) and the per-image influence
        assert {"linear_probe_shuffled", "influence_share"} <= set(keys) and np.isfinite(b.linear_probe_chance)
        np.testing.assert_array_equal(b.influence_images, a.influence_images)
        if step == 2:
            assert "previous" in keys
        if step == 6:  # the two runs' previous probes differ: step 4 in one process, step 2 where step 4 failed
            keys = [k for k in keys if not k.startswith("previous")]
        for key in keys:
            np.testing.assert_allclose(b.get(key), a.get(key), rtol=1e-7, atol=1e-8, err_msg=key)


def test_ddp_a_rank_without_a_probe_minibatch_takes_part_in_every_analysis(tmp_path):
    proc = start(tmp_path, 2, "--probe-size", "8")  # one minibatch of 8: rank 1 has none
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err[-3000:]
    log_dir = tmp_path / "run" / "version_0"
    assert array_steps(log_dir) == [0, 2, 4, 6]  # rank 1 runs no forward pass, so its failure at step 4 never comes
    result = CKAResult.load(log_dir / "cka" / "step_0000006.npz")
    assert result.minibatch_sizes.tolist() == [8] and result.localization is not None
    assert result.linear_probe_accuracy is not None and np.isfinite(result.intra).all()
    assert "left out" not in err

"""CKAMonitor under DDP: two gloo processes write what one process writes, and a failure on rank 1 is reported."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from lit_helpers import array_steps

from lightning_cka import CKAResult

HERE = Path(__file__).parent


def test_ddp_two_processes_write_the_same_arrays_as_one_and_report_a_failure_on_rank_1(tmp_path):
    # Both fits at once: the one-process fit leaves a core idle while the other starts its two processes.
    procs = {
        devices: subprocess.Popen(
            [
                sys.executable,
                str(HERE / "ddp_fit.py"),
                "--devices",
                str(devices),
                "--out",
                str(tmp_path / f"devices{devices}"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "default"},
        )
        for devices in (1, 2)
    }
    outputs = {devices: proc.communicate(timeout=300)[1] for devices, proc in procs.items()}
    for devices, proc in procs.items():
        assert proc.returncode == 0, outputs[devices][-3000:]
    single, double = tmp_path / "devices1" / "run", tmp_path / "devices2" / "run"
    assert [p.name for p in double.iterdir()] == ["version_0"]  # one set of files
    assert array_steps(single / "version_0") == [0, 2, 4, 6]
    assert array_steps(double / "version_0") == [0, 2, 6]  # rank 1 failed at step 4: every rank skipped it
    assert "probe at step 4 failed (rank 1: RuntimeError('rank 1 fails at step 4'))" in outputs[2]
    for step in (0, 2, 6):
        a = CKAResult.load(single / "version_0" / "cka" / f"step_{step:07d}.npz")
        b = CKAResult.load(double / "version_0" / "cka" / f"step_{step:07d}.npz")
        assert a.layers == b.layers and a.reference_layers == b.reference_layers and b.num_examples == 40
        assert b.minibatch_sizes.tolist() == [8, 8, 8, 8, 8]  # 5 minibatches: the ranks have 3 and 2
        keys = [k for k in a if isinstance(a.get(k), np.ndarray) and a.get(k).dtype.kind == "f"]
        assert {"intra", "intra_se", "intra_null", "reference", "reference_null", "mean_attention_distance"} <= set(
            keys
        )
        if step == 2:
            assert "previous" in keys
        if step == 6:  # the two runs' previous probes differ: step 4 in one process, step 2 where step 4 failed
            keys = [k for k in keys if not k.startswith("previous")]
        for key in keys:
            np.testing.assert_allclose(b.get(key), a.get(key), rtol=1e-7, atol=1e-8, err_msg=key)

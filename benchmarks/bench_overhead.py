"""Training time with CKAMonitor relative to training without it, for several probe intervals (as Cockpit reports).

Runs examples/train.py as subprocesses, `--cka-every 0` (no monitor) and each interval alternating within every
round, and divides each run's `fit_seconds` (trainer.fit alone) by the unmonitored run's of the same round. Every run
also probes at step 0 and at the end, as the monitor always does. From the TensorBoard logs it reads the callback's
on-thread probe time (`cka/probe_seconds`); the figures are rendered on a background thread, whose cost is timed
separately here (the FrameCache on the arrays a run saved: the first render draws the figures, later ones blit).
"""

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import describe, parse, parser, print_table, round_ratios, save, summary
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_cka.engine.analysis import View
from lightning_cka.figures.render import FrameCache
from lightning_cka.result import CKAResult

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "train.py"
PRESETS = {
    # examples/train.py's defaults, the README demo: ViT-Ti/4 on digits, 300 steps, validation every 50, a probe of
    # 256 images every 25 steps, ResNet-18 reference.
    "cpu": {"train_args": [], "intervals": [100, 25, 10]},
    # ViT-S/4 on CIFAR-10 with a probe of 1024 (give the data with --train-args "--dataset cifar10 --data-dir DIR").
    "gpu": {
        "train_args": shlex.split(
            "--model vit_small_patch4 --max-steps 3000 --val-every 1000 --batch-size 128 --probe-size 1024 "
            "--cka-batch-size 256"
        ),
        "intervals": [1000, 200, 50],
    },
}
TARGET = {"interval": 200, "max_overhead": 0.02}  # GPU setting
LOCAL_THRESHOLD = 0.5  # CKAMonitor's default: half the uniform-attention distance


def train(args: list[str], every: int, workdir: Path, name: str) -> dict:
    """One examples/train.py run; its summary plus the on-thread probe times it logged."""
    summary_json = workdir / f"{name}.json"
    command = [sys.executable, str(TRAIN), *args, "--cka-every", str(every), "--summary-json", str(summary_json)]
    command += ["--out", str(workdir / "runs"), "--name", name]
    # The training processes get this process's torch thread count (--threads).
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(summary_json.read_text())
    result["probe_seconds"] = []
    if every:
        events = EventAccumulator(result["log_dir"], size_guidance={"scalars": 0})
        events.Reload()
        result["probe_seconds"] = [event.value for event in events.Scalars("cka/probe_seconds")]
    return result


def render_seconds(log_dir: Path, repeats: int) -> dict:
    """Seconds of the first render of a probe's figures and of later ones, on arrays saved by a run."""
    files = sorted((log_dir / "cka").glob("step_*.npz"))
    results = [CKAResult.load(path) for path in files]
    view = View(local_threshold=LOCAL_THRESHOLD)
    cache = FrameCache()

    def render(current: CKAResult, previous: CKAResult) -> int:
        figures = current.figures(previous, view)
        for figure in figures:
            cache.render(figure)
        return len(figures)

    start = time.perf_counter()
    figures = render(results[1], results[0])
    first = time.perf_counter() - start
    later = []
    for i in range(repeats):
        previous, current = results[i % (len(results) - 1)], results[i % (len(results) - 1) + 1]
        start = time.perf_counter()
        render(current, previous)
        later.append(time.perf_counter() - start)
    return {"first_render_s": first, "later_render_s": summary(later), "figures": figures}


def main() -> None:
    cli = parser(__doc__, repeats=3)
    cli.add_argument("--intervals", type=int, nargs="+", help="probe every N steps (default: from the preset)")
    cli.add_argument("--train-args", default="", help="extra flags for examples/train.py, e.g. the dataset")
    args = parse(cli)
    preset = PRESETS[args.preset]
    intervals = args.intervals or preset["intervals"]
    accelerator = ["--accelerator", "gpu", "--devices", "1"] if args.device.type == "cuda" else ["--accelerator", "cpu"]
    train_args = [*preset["train_args"], *accelerator, *shlex.split(args.train_args)]
    print(describe(args.device))
    print(f"examples/train.py {shlex.join(train_args)} --cka-every K (K = 0 and {intervals})")

    runs: dict[int, list[dict]] = {every: [] for every in [0, *intervals]}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.repeats):
            for every in runs:
                runs[every].append(train(train_args, every, Path(tmp), f"every{every}-round{round_index}"))
                print(f"round {round_index}, every {every}: {runs[every][-1]['fit_seconds']:.1f} s")
        rendering = render_seconds(Path(runs[min(intervals)][-1]["log_dir"]), repeats=10)

    baseline = [run["fit_seconds"] for run in runs[0]]
    rows = [{"interval": "no monitor", "fit_seconds": summary(baseline), "steps": runs[0][0]["steps"]}]
    for every in intervals:
        fit = [run["fit_seconds"] for run in runs[every]]
        probes = [seconds for run in runs[every] for seconds in run["probe_seconds"]]
        factor = round_ratios(fit, baseline)
        row = {
            "interval": every,
            "steps": runs[every][0]["steps"],
            "probes_per_run": len(runs[every][0]["probe_seconds"]),
            "fit_seconds": summary(fit),
            "factor": factor,
            "overhead_percent": (factor["median"] - 1) * 100,
            "probe_seconds": summary(probes),
            # On-thread probe time as a share of the monitored run: the rest of the overhead is the writer thread
            # competing for the cores, start-up of the monitor and noise.
            "probe_share_percent": statistics.median(
                sum(run["probe_seconds"]) / run["fit_seconds"] * 100 for run in runs[every]
            ),
        }
        if args.preset == "gpu" and every == TARGET["interval"]:
            row["met"] = "yes" if factor["median"] - 1 <= TARGET["max_overhead"] else "NO"
        rows.append(row)
    path = save("bench_overhead", args, rows, train_args=train_args, rendering=rendering, target=TARGET)

    flat = [
        {
            **row,
            "fit": row["fit_seconds"]["median"],
            "fit_range": f"{row['fit_seconds']['min']:.1f}-{row['fit_seconds']['max']:.1f}",
            "factor": row["factor"]["median"] if "factor" in row else None,
            "factor_range": f"{row['factor']['min']:.3f}-{row['factor']['max']:.3f}" if "factor" in row else None,
            "probe": row["probe_seconds"]["median"] if "probe_seconds" in row else None,
        }
        for row in rows
    ]
    print_table(
        f"Training time relative to no monitor, median of {args.repeats} rounds (written to {path})",
        flat,
        [
            ("probe every", "interval", ""),
            ("steps", "steps", "d"),
            ("probes/run", "probes_per_run", "d"),
            ("fit s", "fit", ".1f"),
            ("fit min-max s", "fit_range", ""),
            ("x no monitor", "factor", ".3f"),
            ("x min-max", "factor_range", ""),
            ("overhead %", "overhead_percent", ".1f"),
            ("on-thread probe s", "probe", ".2f"),
            ("probe share %", "probe_share_percent", ".1f"),
            ("met", "met", ""),
        ],
    )
    later = rendering["later_render_s"]
    print(
        f"\nRendering {rendering['figures']} figures on the writer thread: first probe "
        f"{rendering['first_render_s']:.3f} s, later probes {later['median']:.3f} s "
        f"(median of {len(later['values'])}, {later['min']:.3f}-{later['max']:.3f})"
    )


if __name__ == "__main__":
    main()

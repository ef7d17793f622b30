"""Reading and drawing a run: `lightning-cka summary` of 100 probes, `plot` of one, and cached figure renders.

A run of --probes probe files is written first (compare_models with the default analyses on the floor benchmark's
models, 64 random images in minibatches of 16, saved at steps 0, 100, ... with CKA drifting a little per probe, as
CKAMonitor writes them). Then, each command in a fresh process (what a user waits for: the interpreter, the imports
and the reading), --repeats times: its CPU time (user + system, from the kernel's accounting of the child) and wall
time. Last, the figures of every probe rendered through one FrameCache as the monitor's writer thread does: the first
probe draws every frame, later probes draw on the cached frames.
"""

import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import SETTINGS, build_models, describe, parse, parser, print_table, random_images, save

from lightning_cka import CKAResult, compare_models
from lightning_cka.engine.analysis import View
from lightning_cka.figures.render import FrameCache

TARGET_SUMMARY_S = 1.0  # lightning-cka summary of 100 probes, CPU time


def write_run(folder: Path, probes: int, device: torch.device) -> None:
    setting = SETTINGS["cpu"]
    vit, resnet = build_models(setting, device)
    result = compare_models(vit, resnet, data=random_images(64, setting.img_size, device), batch_size=16)
    values = {key: result.get(key) for key in result}
    for i in range(probes):
        drift = {"intra": np.clip(result.intra + 0.002 * i, -1, 1), "step": 100 * i, "epoch": i // 10}
        CKAResult({**values, **drift}, analyses=result.analyses).save(folder / "cka" / f"step_{100 * i:07d}.npz")


def child_seconds(command: list[str]) -> tuple[float, float]:
    """CPU seconds (user + system) and wall seconds of one command in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


def main() -> None:
    cli = parser(__doc__, repeats=5)
    cli.add_argument("--probes", type=int, default=100)
    args = parse(cli)
    print(describe(args.device))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run" / "version_0"
        write_run(run, args.probes, args.device)
        executable = str(Path(sys.executable).with_name("lightning-cka"))
        commands = {
            f"summary of {args.probes} probes": [executable, "summary", str(run)],
            "plot of the last probe (PNG, 100 dpi)": [
                *(executable, "plot", str(run), "--out", tmp + "/figs", "--dpi", "100")
            ],
        }
        for name, command in commands.items():
            child_seconds(command)  # warm-up: the page cache, .pyc files
            measured = [child_seconds(command) for _ in range(args.repeats)]
            cpu, wall = [m[0] for m in measured], [m[1] for m in measured]
            rows.append(
                {
                    "measured": name,
                    "cpu_s": statistics.median(cpu),
                    "cpu_range": f"{min(cpu):.2f}-{max(cpu):.2f}",
                    "wall_s": statistics.median(wall),
                    "wall_range": f"{min(wall):.2f}-{max(wall):.2f}",
                    "cpu": cpu,
                    "wall": wall,
                    "target_s": TARGET_SUMMARY_S if name.startswith("summary") else None,
                }
            )
        cache, view, previous = FrameCache(), View(run="run"), None
        renders: dict[str, list[float]] = {}
        for i in range(min(args.probes, 20)):
            result = CKAResult.load(run / "cka" / f"step_{100 * i:07d}.npz")
            for figure in result.figures(previous, view):
                start = time.thread_time()
                cache.render(figure)
                kind = "first draw" if i == 0 or (i == 1 and figure.tag == "cka/intra_change") else "later probes"
                renders.setdefault(f"{figure.tag}, {kind}", []).append(time.thread_time() - start)
            previous = result
        for name, seconds in sorted(renders.items()):
            rows.append(
                {
                    "measured": f"render {name}",
                    "cpu_s": statistics.median(seconds),
                    "cpu_range": f"{min(seconds):.3f}-{max(seconds):.3f}",
                    "count": len(seconds),
                }
            )
        rows.append({"measured": "FrameCache hits / misses", "hits": cache.hits, "misses": cache.misses})
    for row in rows:
        if row.get("target_s") is not None:
            row["met"] = "yes" if row["cpu_s"] < row["target_s"] else "NO"
    path = save("bench_cli", args, rows)
    print_table(
        f"Reading and drawing a run of {args.probes} probes, median of {args.repeats} (written to {path}); renders: "
        "CPU time of the rendering thread",
        rows,
        [
            ("measured", "measured", ""),
            ("CPU s", "cpu_s", ".3f"),
            ("CPU min-max", "cpu_range", ""),
            ("wall s", "wall_s", ".3f"),
            ("wall min-max", "wall_range", ""),
            ("renders", "count", "d"),
            ("hits", "hits", "d"),
            ("misses", "misses", "d"),
            ("met (< 1 s CPU)", "met", ""),
        ],
    )


if __name__ == "__main__":
    main()

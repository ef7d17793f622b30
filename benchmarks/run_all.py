"""Run every benchmark, one after the other, then print how each target fared.

    python benchmarks/run_all.py                          # CPU, small sizes
    python benchmarks/run_all.py --device cuda            # GPU sizes (--preset gpu is implied)
    python benchmarks/run_all.py --only floor peers --repeats 3

Flags other than --only are passed to every script. The scripts run sequentially, never side by side: they would
compete for the cores and the memory they measure.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import RESULTS, print_table

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("floor", "peers", "memory", "scaling", "null", "rank", "overhead")


def targets(results: Path) -> list[dict]:
    """One row per target from the JSON files the scripts wrote."""
    rows = []

    def load(name: str) -> dict | None:
        path = results / f"bench_{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    if floor := load("floor"):
        for row in (r for r in floor["rows"] if r.get("target") is not None):
            rows.append(
                {
                    "benchmark": "floor",
                    "target": f"{row['workload']} <= {row['target']}x forward only",
                    "measured": f"{row['ratio'][floor['clock']]['median']:.3f}x ({floor['clock']} time)",
                    "met": row["met"],
                }
            )
    if peers := load("peers"):
        target = peers["target"]
        measured = target["closest_peer_ratio"]
        rows.append(
            {
                "benchmark": "peers",
                "target": f"closest peer >= {target['target_speedup']}x slower (GPU setting)",
                "measured": "-" if measured is None else f"{measured:.2f}x",
                "met": {True: "yes", False: "NO", None: "-"}[target["met"]],
            }
        )
    if memory := load("memory"):
        worst = max(memory["rows"], key=lambda r: r["ratio"])
        rows.append(
            {
                "benchmark": "memory",
                "target": "probe peak <= 1.2x forward-only peak",
                "measured": f"{worst['ratio']:.3f}x at worst ({worst['model']}, batch {worst['batch']})",
                "met": "yes" if all(r["met"] == "yes" for r in memory["rows"]) else "NO",
            }
        )
    if overhead := load("overhead"):
        target = overhead["target"]
        row = next((r for r in overhead["rows"] if r["interval"] == target["interval"]), None)
        rows.append(
            {
                "benchmark": "overhead",
                "target": f"<= {target['max_overhead']:.0%} at a probe every {target['interval']} steps (GPU setting)",
                "measured": "-" if row is None else f"{row['overhead_percent']:.1f}%",
                "met": "-" if row is None else row.get("met", "-"),
            }
        )
    return rows


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    cli.add_argument("--device", default="cpu")
    args, passed_on = cli.parse_known_args()
    for name in args.only:
        command = [sys.executable, str(HERE / f"bench_{name}.py"), "--device", args.device, *passed_on]
        print(f"\n$ {' '.join(command)}", flush=True)
        subprocess.run(command, check=True)
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    print_table(
        f"Targets ({RESULTS / device_type})",
        targets(RESULTS / device_type),
        [
            ("benchmark", "benchmark", ""),
            ("target", "target", ""),
            ("measured", "measured", ""),
            ("met", "met", ""),
        ],
    )


if __name__ == "__main__":
    main()

"""How long ``lightning-cka report`` takes on a group comparison: 3 runs against 3, 13 probes each.

    python benchmarks/bench_report.py [--repeats 3] [--keep DIR]

Each run is one real probe of the CIFAR experiment's sizes (the examples' 6-block ``vit_mini_patch4`` at 32 px
against a quarter-width ``resnet18_cifar``, 1024 probe images in 8 minibatches, every analysis: layer CKA with its
19-permutation null, attention, heads, skip ratios, effective rank, localization and linear probes) written at 13
steps with its CKA jittered per step, so the files have the real fields and sizes. The report is timed in-process,
end to end (reading 78 probe files, findings, events, group differences, every picture, HTML and Markdown), as the
median of ``--repeats`` runs, next to the time of its parts.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

STEPS = tuple(range(0, 1201, 100))  # 13 probes


def make_runs(root: Path) -> tuple[list[Path], list[Path]]:
    """Six runs (3 a side) of 13 probe files each."""
    import timm
    import torch

    import lightning_cka.models  # noqa: F401  (registers the CIFAR ResNet with timm)
    from lightning_cka import compare_models
    from lightning_cka.result import CKAResult

    generator = torch.Generator().manual_seed(0)
    images, labels = (
        torch.rand(1024, 3, 32, 32, generator=generator),
        torch.randint(0, 10, (1024,), generator=generator),
    )
    data = torch.utils.data.TensorDataset(images, labels)
    reference = timm.create_model("resnet18_cifar", num_classes=10, channels=(32, 64, 128, 256)).eval()
    sides: tuple[list[Path], list[Path]] = ([], [])
    for run in range(6):
        torch.manual_seed(run)
        vit = timm.create_model(
            "vit_tiny_patch16_224",
            img_size=32,
            patch_size=4,
            depth=6,
            embed_dim=96,
            num_heads=4,
            num_classes=10,
            global_pool="avg",
        ).eval()
        result = compare_models(
            vit,
            reference,
            data=data,
            batch_size=128,
            reduction="mean",
            analyses=["default", "localization", "linear_probe"],
            label_b="resnet18_cifar",
        )
        folder = root / f"{'large' if run < 3 else 'small'}-seed{run % 3}" / "version_0"
        rng = np.random.default_rng(run)
        for step in STEPS:
            fields = {key: result.get(key) for key in result}
            jitter = 0.005 * rng.standard_normal(result.intra.shape)
            fields["intra"] = np.clip(result.intra + (jitter + jitter.T) / 2, -1, 1)
            fields["step"], fields["run"] = step, f"{folder.parent.name}/version_0"
            CKAResult(fields, analyses=result.analyses).save(folder / "cka" / f"step_{step:07d}.npz")
        sides[run >= 3].append(folder)
    return sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="write the runs and reports here (default: a temporary folder)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-report-"))
    start = time.perf_counter()
    large, small = make_runs(root)
    print(f"made 6 runs of {len(STEPS)} probes in {time.perf_counter() - start:.1f} s under {root}")

    from lightning_cka.cli import main as cli
    from lightning_cka.cli.runs import read_run
    from lightning_cka.findings import RunProbes, Side
    from lightning_cka.report import build_report
    from lightning_cka.report.document import Pictures, layout

    argv = ["report", *map(str, large), "--vs", *map(str, small), "--labels", "large", "small"]
    totals, parts = [], {"read": [], "build": [], "pictures": []}
    for repeat in range(args.repeats):
        start = time.perf_counter()
        assert cli([*argv, "--out", str(root / f"report{repeat}.html")]) == 0
        totals.append(time.perf_counter() - start)
        start = time.perf_counter()
        sides = [Side(n, [RunProbes(p.name, read_run(p).probes) for p in g]) for n, g in (("A", large), ("B", small))]
        parts["read"].append(time.perf_counter() - start)
        start = time.perf_counter()
        report = build_report(sides)
        parts["build"].append(time.perf_counter() - start)
        start = time.perf_counter()
        layout(report, Pictures())
        parts["pictures"].append(time.perf_counter() - start)
    print(
        f"report of 3 vs 3 runs x {len(STEPS)} probes: median {statistics.median(totals):.2f} s "
        f"(runs: {', '.join(f'{t:.2f}' for t in totals)})"
    )
    for name, times in parts.items():
        print(f"  {name}: median {statistics.median(times):.2f} s")


if __name__ == "__main__":
    main()

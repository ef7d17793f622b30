"""Print the numbers of docs/experiments/cifar10-cpu.md from the runs' own probe files.

    python docs/experiments/cifar10_numbers.py runs/cifar10-cpu

reads the last probe of the reference ResNet (``resnet-reference``) and of every ViT run that
``examples/small_vs_large.py --out runs/cifar10-cpu/vit --seeds N`` made (``small-seed*``, ``large-seed*``), and
prints, per finding of Raghu et al. 2021, each run's value with its block-jackknife standard error where the probe has
one, and each side's mean and spread over seeds. Everything comes from ``CKAResult.scalars()`` and the stored arrays:
what the monitor logged, nothing recomputed from the model.
"""

import argparse
import statistics
from pathlib import Path

import numpy as np

from lightning_cka.cli.runs import read_run
from lightning_cka.result import CKAResult


def main() -> None:
    """Print every table of the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="the folder that holds resnet-reference/ and vit/")
    args = parser.parse_args()
    resnet = last_probe(args.root / "resnet-reference")
    sides = {side: runs(args.root / "vit", side) for side in ("small", "large")}
    print("## CKA structure (last probe)")
    print(f"resnet reference offdiag_mean {fmt(resnet.scalars(), 'cka/offdiag_mean')}")
    per_layer_table(sides, "cka/offdiag_mean", "cka/adjacent_mean", "cka/reference_best_mean", "rank/mean")
    first = sides["large"][0][1]
    print("\n## reference_intra of the large seed 0 probe (the ResNet's own CKA on the ViT's probe)")
    print_matrix(first.reference_intra, first.reference_layers)
    print("\n## ViT x ResNet (large, seed 0): best reference layer per ViT layer")
    for name, row in zip(first.layers, first.reference, strict=True):
        best = int(np.nanargmax(row))
        print(f"  {name}: {first.reference_layers[best]} ({row[best]:.3f})")
    print("\n## attention")
    per_layer_table(
        sides, "attention/first_layer_distance", "attention/last_layer_distance", "attention/local_fraction"
    )
    print(f"  uniform distance {first.uniform_attention_distance:.2f} px")
    for side, probes in sides.items():
        mins = [np.nanmin(p.mean_attention_distance, axis=1) for _, p in probes]
        print(f"  {side}: per-layer min head distance, seed mean " + " ".join(f"{v:.2f}" for v in np.mean(mins, 0)))
    print("\n## heads vs reference, skip connections, localization, linear probes")
    per_layer_table(
        sides,
        "heads/distance_cka_spearman",
        "residual/cls_vs_patch_lower",
        "residual/cls_vs_patch_upper",
        "localization/own_position_fraction",
        "localization/mean_offset_px",
        "linear_probe/best_gap_accuracy",
        "linear_probe/best_cls_accuracy",
    )
    for side, probes in sides.items():
        curves = [p.linear_probe_accuracy for _, p in probes if p.get("linear_probe_accuracy") is not None]
        for column, token in enumerate(("CLS", "GAP")):
            layer_means = np.mean([c[:, column] for c in curves], axis=0)
            print(f"  {side} {token} probe accuracy by layer (seed mean): " + " ".join(f"{v:.3f}" for v in layer_means))
    print("\n## over training (large seed 0 and small seed 0): offdiag_mean, local_fraction, first-layer distance")
    for side in ("small", "large"):
        run = read_run(sides[side][0][0])
        for step in run.steps:
            s = run.probe(step).scalars()
            local, first_distance = s.get("attention/local_fraction", np.nan), s.get("attention/first_layer_distance")
            print(f"  {side} step {step}: {fmt(s, 'cka/offdiag_mean')}, local {local:.3f}, first {first_distance:.2f}")


def runs(folder: Path, side: str) -> list[tuple[Path, CKAResult]]:
    """Every seed of one side: its version folder and last probe."""
    found = sorted(folder.glob(f"{side}-seed*/version_*")) or sorted(folder.glob(f"{side}/version_*"))
    if not found:
        raise SystemExit(f"no {side} runs under {folder}")
    return [(path, last_probe(path)) for path in found]


def last_probe(path: Path) -> CKAResult:
    """The last probe of a run folder (or of its only version folder)."""
    versions = sorted(path.glob("version_*"))
    run = read_run(versions[-1] if versions else path)
    return run.probe(run.steps[-1])


def per_layer_table(sides: dict[str, list[tuple[Path, CKAResult]]], *keys: str) -> None:
    """One line per scalar: each run's value (± its jackknife se) and each side's mean ± sd over seeds."""
    for key in keys:
        cells = []
        for side, probes in sides.items():
            values = [p.scalars().get(key, np.nan) for _, p in probes]
            each = ", ".join(fmt(p.scalars(), key) for _, p in probes)
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells.append(f"{side}: {statistics.fmean(values):.3f} ± {spread:.3f} sd ({each})")
        print(f"{key}: " + " | ".join(cells))


def fmt(scalars: dict[str, float], key: str) -> str:
    """``0.812 ± 0.004``: the scalar and its jackknife standard error where the probe has one."""
    value, se = scalars.get(key, np.nan), scalars.get(f"{key}_se")
    return f"{value:.3f}" + (f" ± {se:.3f}" if se is not None and np.isfinite(se) else "")


def print_matrix(matrix: np.ndarray, names: tuple[str, ...]) -> None:
    """One line per row, named."""
    for name, row in zip(names, matrix, strict=True):
        print(f"  {name:>10} " + " ".join(f"{v:5.2f}" for v in row))


if __name__ == "__main__":
    main()

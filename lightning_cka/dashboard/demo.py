"""Synthetic figures shaped like the monitor's, to try the "CKA" tab without training.

Also what the dashboard's tests and screenshots show:

    python -m lightning_cka.dashboard.demo runs/dashboard-demo && tensorboard --logdir runs/dashboard-demo

writes three runs: ``vit-large`` and ``vit-small`` (same probe images, so their difference is allowed), and
``vit-other-probe`` (another probe). The numbers are made up: smooth functions of the layer and the step that look
like what a ViT gives (block structure forming, early heads local, later heads global), not a measurement.
"""

import argparse
from pathlib import Path

import numpy as np

from lightning_cka.figures.spec import Curves, Dots, Figure, Heatmap, Line, Scatter, Series

REFERENCE_LAYERS = tuple(f"layer{s + 1}.{b}" for s, blocks in enumerate((3, 4, 6, 3)) for b in range(blocks))
IMAGE_SIZE, PATCH = 224, 16
UNIFORM_DISTANCE = 0.5214 * IMAGE_SIZE  # mean distance of two uniform points in a square
LOCAL_THRESHOLD = 48.0


def layer_names(layers: int) -> tuple[str, ...]:
    """ViT block names ``blocks.0`` to ``blocks.<layers - 1>``."""
    return tuple(f"blocks.{i}" for i in range(layers))


def intra_values(layers: int, progress: float) -> np.ndarray:
    """A symmetric ``(layers, layers)`` CKA matrix, 1 on the diagonal, with blocks widening as ``progress`` grows."""
    i = np.arange(layers)
    width = (0.6 + 3.0 * progress) * layers / 12
    cka = np.exp(-np.abs(i[:, None] - i[None, :]) / width)
    floor = 0.04 + 0.1 * progress  # far-apart layers: as similar as unrelated images early, a little more later
    cka = floor + (1 - floor) * cka
    np.fill_diagonal(cka, 1.0)
    return np.clip(cka, 0.0, 1.0)


def figures(
    step: int, *, run: str, layers: int = 12, heads: int = 6, progress: float = 1.0, probe: str = "probe-3f2a9c"
) -> list[Figure]:
    """The figures of one probe at ``step``.

    Args:
        step: the probe's step, written into every figure's ``meta``.
        run: the run name for ``meta`` and the subtitle.
        layers: model blocks.
        heads: attention heads per block.
        progress: 0 (untrained) to 1 (trained); the values move with it.
        probe: the probe fingerprint; two runs with the same one may be subtracted.
    """
    rng = np.random.default_rng(step * 7919 + layers)
    names = layer_names(layers)
    meta = {"step": step, "run": run, "probe": probe, "num_examples": 512}
    subtitle = f"{run}, step {step}"
    cka = intra_values(layers, progress)
    noise = rng.normal(0, 0.01, cka.shape)
    cka = np.clip(cka + (noise + noise.T) / 2, 0, 1)
    np.fill_diagonal(cka, 1.0)
    error = np.full_like(cka, 0.012) + 0.01 * (1 - cka)
    null = np.full_like(cka, 0.1)
    before = intra_values(layers, max(progress - 0.1, 0.0))
    change = cka - before
    bound = float(np.abs(change).max()) or 1.0
    ref = np.exp(
        -(((np.arange(layers)[:, None] / layers) - np.linspace(0, 1, 16)[None, :]) ** 2) / (0.02 + 0.05 * progress)
    )
    distances = _mean_distances(layers, heads, progress, rng)
    return [
        Figure(
            "cka/intra",
            "Minibatch CKA between the model's layers",
            (
                Heatmap(
                    cka,
                    names,
                    names,
                    title="model",
                    error=error,
                    null=null,
                    marked=cka <= null,
                    mark_label="indistinguishable from unrelated images",
                ),
            ),
            caption="Bright: two layers represent the probe images alike. A dot: as similar as unrelated images.",
            subtitle=subtitle,
            meta=meta,
        ),
        Figure(
            "cka/reference",
            "CKA between the model's layers and the reference's",
            (
                Heatmap(
                    0.1 + 0.8 * ref, names, REFERENCE_LAYERS, col_label="reference layer", title="model x ResNet-50"
                ),
            ),
            caption="Rows: model layers; columns: reference layers.",
            subtitle=subtitle,
            meta=meta,
        ),
        Figure(
            "cka/intra_change",
            "Change of CKA since the previous probe",
            (Heatmap(change, names, names, vmin=-bound, vmax=bound, cmap="diverging", colorbar="Δ CKA"),),
            caption="Red: more similar than at the previous probe; blue: less.",
            subtitle=subtitle,
            meta=meta,
        ),
        Figure(
            "attention/mean_distance",
            "Mean attention distance per head",
            (
                Dots(
                    names,
                    (Series("", distances),),
                    y_label="mean attention distance (px)",
                    lines=(
                        Line(LOCAL_THRESHOLD, f"local threshold ({LOCAL_THRESHOLD:.0f} px)"),
                        Line(UNIFORM_DISTANCE, "uniform attention", style="dotted"),
                    ),
                    ylim=(0.0, IMAGE_SIZE * 0.75),
                ),
            ),
            caption="Each dot is a head; heads under the dashed line attend locally.",
            subtitle=subtitle,
            meta=meta,
        ),
        Figure(
            "attention/heads_vs_reference",
            "Heads: attention distance against similarity to the reference",
            (
                Scatter(
                    tuple(
                        Series(name, np.stack([distances[i], 0.3 + 0.6 * ref[i].max() * (1 - distances[i] / 200)], 1))
                        for i, name in enumerate(names)
                    ),
                    x_label="mean attention distance (px)",
                    y_label="CKA with the closest reference layer",
                ),
            ),
            subtitle=subtitle,
            meta=meta,
        ),
        Figure(
            "residual/norm_ratio",
            "Norm of each branch against the residual stream",
            (
                Heatmap(
                    np.stack([0.2 + 0.5 * progress * np.linspace(1, 0.3, layers), np.linspace(0.6, 0.2, layers)], 1),
                    names,
                    ("attention", "MLP"),
                    col_label="branch",
                    colorbar="‖branch‖ / ‖x‖",
                ),
                Curves(
                    names,
                    (
                        Series("attention", 0.2 + 0.5 * progress * np.linspace(1, 0.3, layers)),
                        Series("MLP", np.linspace(0.6, 0.2, layers)),
                    ),
                    y_label="‖branch‖ / ‖x‖",
                    ylim=(0.0, 1.0),
                ),
            ),
            subtitle=subtitle,
            meta=meta,
        ),
        Figure(
            "localization/maps",
            "Attention of the class token to the patches",
            tuple(_attention_map(layer, layers, progress) for layer in (0, layers // 3, 2 * layers // 3, layers - 1)),
            subtitle=subtitle,
            meta=meta,
        ),
        Figure(
            "linear_probe/accuracy",
            "Linear probe accuracy per layer",
            (
                Curves(
                    names,
                    (
                        Series("train", 0.3 + 0.6 * progress * np.linspace(0.2, 1, layers)),
                        Series(
                            "validation",
                            0.25 + 0.55 * progress * np.linspace(0.2, 1, layers),
                            np.full(layers, 0.02),
                        ),
                    ),
                    y_label="accuracy",
                    ylim=(0.0, 1.0),
                    lines=(Line(0.1, "chance", style="dotted"),),
                ),
            ),
            subtitle=subtitle,
            meta=meta,
        ),
        Figure(
            "rank/effective_rank",
            "Effective rank of each layer's features",
            (Curves(names, (Series("", 20 + 60 * progress * np.sin(np.linspace(0.3, 2.8, layers))),), y_label="rank"),),
            subtitle=subtitle,
            meta=meta,
        ),
    ]


def _mean_distances(layers: int, heads: int, progress: float, rng: np.random.Generator) -> np.ndarray:
    depth = np.linspace(0, 1, layers)[:, None]
    spread = np.linspace(0, 1, heads)[None, :]
    # untrained heads all attend almost uniformly; training makes early heads split into local and global ones
    trained = 20 + 100 * (depth + (1 - depth) * spread) ** 1.5
    values = (1 - progress) * UNIFORM_DISTANCE + progress * trained
    return values + rng.normal(0, 2, values.shape)


def _attention_map(layer: int, layers: int, progress: float) -> Heatmap:
    side = IMAGE_SIZE // PATCH
    y, x = np.mgrid[0:side, 0:side]
    width = 1.5 + 6 * layer / max(layers - 1, 1) + 4 * (1 - progress)
    attention = np.exp(-((x - side * 0.55) ** 2 + (y - side * 0.45) ** 2) / (2 * width**2))
    ticks = tuple(str(i) for i in range(side))
    return Heatmap(
        attention / attention.max(),
        ticks,
        ticks,
        row_label="patch row",
        col_label="patch column",
        title=f"blocks.{layer}",
        colorbar="attention (max 1)",
    )


def write_demo(logdir: Path, steps: tuple[int, ...] = tuple(range(0, 301, 50)), layers: int = 12) -> list[Path]:
    """Write the three demo runs under ``logdir`` with a real ``SummaryWriter``; return their folders."""
    from torch.utils.tensorboard import SummaryWriter  # only here: the rest of the dashboard needs no torch

    from lightning_cka.dashboard.summaries import write_figures

    runs = {
        "vit-large": (1.0, "probe-3f2a9c"),
        "vit-small": (0.55, "probe-3f2a9c"),
        "vit-other-probe": (0.8, "probe-77e0b1"),
    }
    folders = []
    for run, (reach, probe) in runs.items():
        folder = logdir / run
        writer = SummaryWriter(str(folder))
        for step in steps:
            progress = reach * step / max(steps[-1], 1)
            write_figures(writer, figures(step, run=run, layers=layers, progress=progress, probe=probe), step)
            writer.add_scalar("train/loss", 2.3 * (1 - 0.7 * progress), step)
        writer.close()
        folders.append(folder)
    return folders


def main() -> None:
    """Write the demo runs to the folder named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    for folder in write_demo(args.logdir, layers=args.layers):
        print(folder)
    print(f"tensorboard --logdir {args.logdir} --samples_per_plugin lightning_cka=0")


if __name__ == "__main__":
    main()

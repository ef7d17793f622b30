"""Real probes of small random timm models, to try the "CKA" tab without training one first.

Also what the dashboard's tests and screenshots show:

    python -m lightning_cka.dashboard.demo runs/dashboard-demo && tensorboard --logdir runs/dashboard-demo

writes three runs: an 8-block ViT (32 px images, 4 px patches) trained for 60 steps of AdamW on a synthetic four-class
task, next to a random ResNet reference, probed with :func:`lightning_cka.compare_models` every 10 steps (about half a
minute on one CPU core): ``vit-large`` (a larger learning rate) and ``vit-small`` (a smaller one) on the same probe
images, so their difference is allowed, and ``vit-other-probe`` on other probe images. Every number is a real
measurement of these models; the task is synthetic (oriented gratings in noise), so what the figures show is how the
tool reads a model, not what a ViT learns from real images.
"""

import argparse
import functools
from pathlib import Path

import numpy as np

STEPS = tuple(range(0, 61, 10))
RUNS = {  # name: (learning rate, seed of the probe images)
    "vit-large": (3e-3, 0),
    "vit-small": (5e-4, 0),
    "vit-other-probe": (1e-3, 1),
}
PROBE_IMAGES, CLASSES, SIZE = 64, 4, 32


def images(count: int, seed: int) -> tuple["Tensor", "Tensor"]:  # noqa: F821
    """``count`` synthetic images: Gaussian noise plus a grating whose orientation is the class (0 to 3)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    y, x = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    angles = labels.float() * torch.pi / CLASSES
    waves = torch.sin((x * torch.cos(angles)[:, None, None] + y * torch.sin(angles)[:, None, None]) * 0.6)
    noise = torch.randn(count, 3, SIZE, SIZE, generator=generator)
    return noise + 1.5 * waves[:, None], labels


@functools.lru_cache(maxsize=8)
def probes(run: str, steps: tuple[int, ...] = STEPS) -> tuple:
    """The probe results of ``run`` at ``steps`` (:class:`lightning_cka.CKAResult`, with ``step`` and ``run`` set)."""
    import timm
    import torch
    from torch.utils.data import TensorDataset

    from lightning_cka.compare import compare_models

    lr, probe_seed = RUNS[run]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        vit = timm.create_model(
            "vit_tiny_patch16_224", img_size=SIZE, patch_size=4, depth=8, embed_dim=32, num_heads=2, num_classes=4
        )
        reference = timm.create_model("test_resnet", num_classes=CLASSES).eval()
        probe = TensorDataset(*images(PROBE_IMAGES, 1000 + probe_seed))
        train_images, train_labels = images(16 * steps[-1], 7)
        optimizer = torch.optim.AdamW(vit.parameters(), lr=lr, weight_decay=0.05)
        results, done, previous = [], 0, None
        for step in steps:
            vit.train()
            for i in range(done, step):
                batch = slice(16 * i, 16 * (i + 1))
                loss = torch.nn.functional.cross_entropy(vit(train_images[batch]), train_labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            done = step
            result = compare_models(
                vit, reference, data=probe, batch_size=16, analyses=["default", "linear_probe"], label_b="test_resnet"
            )
            result.step, result.run = step, run
            results.append((result, previous))
            previous = result
        return tuple(results)
    finally:
        torch.set_num_threads(threads)


def figures(run: str, step: int, steps: tuple[int, ...] = STEPS) -> list:
    """The figures of ``run`` at ``step``, as the demo writes them."""
    from lightning_cka.engine.analysis import View

    result, previous = next((r, p) for r, p in probes(run, steps) if r.step == step)
    return result.figures(previous, View(run=run))


def write_demo(logdir: Path, steps: tuple[int, ...] = STEPS) -> list[Path]:
    """Write the three demo runs under ``logdir``: TensorBoard events and probe files; return their folders.

    The probe files (``<run>/cka/step_<step>.npz``, as the monitor writes them) let the command line read the demo:
    ``lightning-cka report runs/dashboard-demo/vit-large --vs runs/dashboard-demo/vit-small``.
    """
    from torch.utils.tensorboard import SummaryWriter

    from lightning_cka.dashboard.summaries import write_figures

    folders = []
    for run in RUNS:
        folder = logdir / run
        writer = SummaryWriter(str(folder))
        for result, _ in probes(run, steps):
            result.save(folder / "cka" / f"step_{result.step:07d}.npz")
            write_figures(writer, figures(run, result.step, steps), result.step)
            for tag, value in result.scalars().items():
                if np.isfinite(value):
                    writer.add_scalar(tag, value, result.step)
        writer.close()
        folders.append(folder)
    return folders


def main() -> None:
    """Write the demo runs to the folder named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdir", type=Path)
    args = parser.parse_args()
    for folder in write_demo(args.logdir):
        print(folder)
    print(f"tensorboard --logdir {args.logdir} --samples_per_plugin lightning_cka=0")
    print(f"lightning-cka report {args.logdir}/vit-large --vs {args.logdir}/vit-small --out demo-report.html")


if __name__ == "__main__":
    main()

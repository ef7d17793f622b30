"""Make docs/images/linear-probe-accuracy.png from a real probe: an untrained timm test_vit on scikit-learn digits.

    python docs/make_linear_probe_image.py            # about 20 s on two CPU cores

The 1797 8x8 digits are upscaled to the model's 160 px (RGB, standardized); 1024 drawn at random are the probe
(512 fitted, 512 scored), in minibatches of 64. The figure is the one ``CKAMonitor`` would log under
``linear_probe/accuracy``.
"""

import argparse
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

import lightning_cka.analyses as analyses
from lightning_cka.analyses.linear_probe import LinearProbe
from lightning_cka.engine.analysis import View
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
from lightning_cka.engine.options import ProbeOptions
from lightning_cka.figures.render import draw_figure
from lightning_cka.result import CKAResult


def main() -> None:
    """Probe, draw, save."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "images" / "linear-probe-accuracy.png")
    parser.add_argument("--images", type=int, default=1024)
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    if LinearProbe not in analyses.ANALYSES:  # until the analysis is registered, CKAResult needs to know its fields
        analyses.ANALYSES = (*analyses.ANALYSES, LinearProbe)
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10).eval()
    size = model.patch_embed.img_size
    digits = load_digits()
    # A random draw, as CKAMonitor's probe: the file cycles through the classes 0..9, which an even/odd split must not
    # see (the fit half would get mostly even digits).
    order = np.random.default_rng(0).permutation(len(digits.target))[: args.images]
    images = torch.tensor(digits.images[order], dtype=torch.float32).unsqueeze(1) / 16
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target[order])
    batches = [
        ProbeBatch(i, start, images[start : start + 64], labels[start : start + 64])
        for i, start in enumerate(range(0, len(labels), 64))
    ]
    engine = ProbeEngine([ProbedModel("model", model)], [LinearProbe(ProbeOptions(linear_probe=True))])
    engine.run(batches, len(batches), torch.device("cpu"))
    fields = engine.compute()
    result = CKAResult({**fields, "num_examples": len(labels), "intra": np.eye(len(fields["layers"]))})
    (figure,) = LinearProbe.figures(result, None, View(run="untrained test_vit on digits"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw_figure(figure).fig.savefig(args.out)
    print(f"{args.out}: accuracy (cls, gap) per layer {np.round(fields['linear_probe_accuracy'], 3).tolist()}")
    print(f"chance {fields['linear_probe_chance']:.3f}, λ {np.array2string(fields['linear_probe_ridge'], precision=3)}")


if __name__ == "__main__":
    main()

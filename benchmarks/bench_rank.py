"""Effective rank (RankMe) of real layer Grams: exact eigvalsh against the estimator, error and time per minibatch size.

The Grams are those the probe computes (centered, float32, flattened outputs) of every block of a ViT and a ResNet
(the floor benchmark's models, random weights) on real images (scikit-learn's digits, upscaled; or the images of
--image-folder, e.g. CIFAR-10's test set) and on noise. For each minibatch size n the script times and compares:

- "exact, float64": eigvalsh in float64, the reference (the package's method before this round);
- "exact": what effective_rank computes below LANCZOS_FROM (eigvalsh in the Gram's precision);
- "lanczos": the O(n²) estimator effective_rank uses from LANCZOS_FROM on, over --seeds seeds;

and, to size the errors, how much the exact value itself moves with the resolution of the Gram: the same features'
Gram in float64 (whose cut is at float64 precision), and the cut at 10x its value.
"""

import glob
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import SETTINGS, build_models, describe, parse, parser, print_table, random_images, save

from lightning_cka import find_layers
from lightning_cka.functional.hsic import gram
from lightning_cka.functional.rank import _rank, _spectrum_sums, effective_rank


def digits(size: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return (images - images.mean()) / images.std()


def folder(pattern: str, count: int, size: int) -> torch.Tensor:
    from PIL import Image

    files = sorted(glob.glob(pattern))
    files = [files[i] for i in np.random.default_rng(0).choice(len(files), count, replace=False)]
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)) for f in files])
    images = F.interpolate(images.permute(0, 3, 1, 2) / 255, size=size, mode="bilinear", align_corners=False)
    return (images - images.mean((0, 2, 3), keepdim=True)) / images.std((0, 2, 3), keepdim=True)


def layer_features(model: torch.nn.Module, images: torch.Tensor, chunk: int = 256) -> list[torch.Tensor]:
    modules, names = dict(model.named_modules()), find_layers(model)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        modules[name].register_forward_hook(lambda m, a, out, name=name: parts[name].append(out.detach().clone()))
        for name in names
    ]
    with torch.no_grad():
        for batch in images.split(chunk):
            model(batch)
    for handle in handles:
        handle.remove()
    return [torch.cat(parts[name]) for name in names]


def cut_rank(grams: torch.Tensor, factor: float) -> torch.Tensor:
    """The exact rank with the cut at ``factor`` times its value."""
    values = torch.linalg.eigvalsh(grams.double())
    eps = factor * torch.finfo(grams.dtype).eps
    return _rank(*_spectrum_sums(values, eps), torch.ones(len(grams), dtype=torch.bool))


def timed(call):
    start = time.thread_time()
    out = call()
    return out, time.thread_time() - start


def main() -> None:
    cli = parser(__doc__, repeats=1)
    cli.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    cli.add_argument("--seeds", type=int, default=3, help="seeds of the estimator")
    cli.add_argument("--image-folder", help="a glob of image files (e.g. '/data/cifar10/test/*/*'), in place of digits")
    args = parse(cli)
    setting = SETTINGS[args.preset]
    vit, resnet = build_models(setting, args.device)
    sources = {"noise": random_images(max(args.sizes), setting.img_size, args.device)}
    if args.image_folder:
        sources["images"] = folder(args.image_folder, max(args.sizes), setting.img_size)
    else:
        sources["digits"] = digits(setting.img_size)
    print(describe(args.device))
    rows = []
    for source, images in sources.items():
        for n in args.sizes:
            if n > len(images):
                continue
            for tag, model in (("ViT", vit), ("ResNet", resnet)):
                features = layer_features(model, images[:n])
                grams = torch.stack([gram(f, center=True) for f in features])
                reference, seconds64 = timed(lambda g=grams: cut_rank(g, 1.0))  # float64 eigvalsh, float32 cut
                exact, seconds = timed(lambda g=grams: effective_rank(g, method="exact"))
                estimates, estimate_seconds = [], []
                for seed in range(args.seeds):
                    estimate, spent = timed(lambda g=grams, s=seed: effective_rank(g, method="lanczos", seed=s))
                    estimates.append(estimate)
                    estimate_seconds.append(spent)
                errors = torch.stack([(e - reference).abs() / reference for e in estimates])
                float64_gram = effective_rank(torch.stack([gram(f.double(), center=True) for f in features]))
                cut10 = cut_rank(grams, 10.0)
                rows.append(
                    {
                        "source": source,
                        "n": n,
                        "model": tag,
                        "layers": len(grams),
                        "rank_min": float(reference.min()),
                        "rank_max": float(reference.max()),
                        "exact_float64_s": seconds64,
                        "exact_s": seconds,
                        "exact_vs_float64_max": float(((exact - reference).abs() / reference).max()),
                        "lanczos_s": statistics.median(estimate_seconds),
                        "lanczos_error_median": float(errors.median()),
                        "lanczos_error_max": float(errors.max()),
                        "float64_gram_change_max": float(((float64_gram - reference).abs() / reference).max()),
                        "cut_x10_change_max": float(((cut10 - reference).abs() / reference).max()),
                    }
                )
                print(rows[-1], flush=True)
    path = save("bench_rank", args, rows, setting=setting)
    print_table(
        f"Effective rank: exact eigvalsh against the Lanczos estimator, per minibatch size (written to {path}); "
        "times are CPU seconds for all layers of one minibatch",
        rows,
        [
            ("images", "source", ""),
            ("n", "n", "d"),
            ("model", "model", ""),
            ("rank range", "rank_min", ".0f"),
            ("", "rank_max", ".0f"),
            ("eigvalsh f64 s", "exact_float64_s", ".2f"),
            ("exact s", "exact_s", ".2f"),
            ("exact vs f64", "exact_vs_float64_max", ".1e"),
            ("lanczos s", "lanczos_s", ".2f"),
            ("lanczos error median", "lanczos_error_median", ".2%"),
            ("max", "lanczos_error_max", ".2%"),
            ("float64 Gram moves it", "float64_gram_change_max", ".1%"),
            ("cut x10 moves it", "cut_x10_change_max", ".1%"),
        ],
    )


if __name__ == "__main__":
    main()

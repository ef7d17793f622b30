"""Peak memory of a probe against a forward-only pass, as the batch and the model width grow.

A probe is what CKAMonitor and compare_models do per minibatch: one forward pass with a Gram hook on every residual
block and the attention taps of a ViT, then the HSIC of every layer pair (compare_models on one minibatch). The floor
is the same forward pass under torch.no_grad in eval mode. What the probe adds should be the Grams (layers x n² floats)
and bounded scratch buffers, not something that grows with the layers' feature size.
"""

import statistics

import timm
import torch
from common import MEMORY_METHOD, MIB, describe, parse, parser, peak_memory, print_table, random_images, save

from lightning_cka import compare_models, find_layers

TARGET = 1.2  # probe peak / forward-only peak
VIT_96 = {"img_size": 96}
PRESETS = {  # (timm model, create_model kwargs, batch size); the CPU preset runs at 96 px, the GPU one at 224 px
    "cpu": [
        ("vit_tiny_patch16_224", VIT_96, 16),
        ("vit_tiny_patch16_224", VIT_96, 64),
        ("vit_tiny_patch16_224", VIT_96, 256),
        ("vit_small_patch16_224", VIT_96, 64),
        ("vit_base_patch16_224", VIT_96, 64),
        ("resnet18", {}, 16),
        ("resnet18", {}, 64),
        ("resnet18", {}, 256),
        ("resnet50", {}, 64),
    ],
    "gpu": [
        ("vit_base_patch16_224", {}, 64),
        ("vit_base_patch16_224", {}, 256),
        ("vit_base_patch16_224", {}, 1024),
        ("vit_small_patch16_224", {}, 256),
        ("vit_large_patch16_224", {}, 256),
        ("resnet50", {}, 64),
        ("resnet50", {}, 256),
        ("resnet50", {}, 1024),
        ("wide_resnet50_2", {}, 256),
    ],
}
IMG_SIZE = {"cpu": 96, "gpu": 224}


def memory_task(name: str, kwargs: dict, batch_size: int, img_size: int, mode: str, device: torch.device) -> object:
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).to(device).eval()
    images = random_images(batch_size, img_size, device)
    if mode == "probe":
        return lambda: compare_models(model, data=images, batch_size=batch_size)

    def forward() -> None:
        with torch.no_grad():
            model(images)

    return forward


def calibration_task(num_bytes: int, device: torch.device) -> object:
    """A known allocation, to check what the method reports."""
    return lambda: torch.empty(num_bytes // 4, device=device).fill_(1.0)


def main() -> None:
    args = parse(parser(__doc__, repeats=1))
    img_size = IMG_SIZE[args.preset]
    method = MEMORY_METHOD[args.device.type]
    print(describe(args.device))
    print(f"peak memory: {method}")
    known = 256 * MIB
    calibration = peak_memory(calibration_task, known, args.device, device=args.device) / MIB
    print(f"calibration: a {known / MIB:.0f} MiB tensor measures {calibration:.1f} MiB")

    rows = []
    for name, kwargs, batch_size in PRESETS[args.preset]:
        model = timm.create_model(name, **kwargs)
        layers = len(find_layers(model))
        width = getattr(model, "embed_dim", None) or model.num_features
        measured = {
            mode: [
                peak_memory(memory_task, name, kwargs, batch_size, img_size, mode, args.device, device=args.device)
                for _ in range(args.repeats)
            ]
            for mode in ("forward", "probe")
        }
        peaks = {mode: statistics.median(values) for mode, values in measured.items()}
        ratio = peaks["probe"] / peaks["forward"]
        rows.append(
            {
                "model": name,
                "width": width,
                "batch": batch_size,
                "layers": layers,
                "forward_mib": peaks["forward"] / MIB,
                "probe_mib": peaks["probe"] / MIB,
                "extra_mib": (peaks["probe"] - peaks["forward"]) / MIB,
                "grams_mib": layers * batch_size**2 * 4 / MIB,  # the float32 Grams a probe keeps per minibatch
                "ratio": ratio,
                "measured_mib": {mode: [v / MIB for v in values] for mode, values in measured.items()},
                "met": "yes" if ratio <= TARGET else "NO",
            }
        )
        print(
            f"{name} batch {batch_size}: forward {rows[-1]['forward_mib']:.1f} MiB, probe {rows[-1]['probe_mib']:.1f}"
        )
    path = save(
        "bench_memory", args, rows, method=method, calibration_mib={"allocated": known / MIB, "measured": calibration}
    )
    print_table(
        f"Peak memory above the models and images, {img_size} px images, median of {args.repeats} measurement(s) "
        f"in fresh processes, target probe <= {TARGET}x forward "
        f"(written to {path})",
        rows,
        [
            ("model", "model", ""),
            ("width", "width", "d"),
            ("batch", "batch", "d"),
            ("layers", "layers", "d"),
            ("forward MiB", "forward_mib", ".1f"),
            ("probe MiB", "probe_mib", ".1f"),
            ("probe - forward MiB", "extra_mib", ".1f"),
            ("Grams MiB", "grams_mib", ".2f"),
            ("probe / forward", "ratio", ".3f"),
            ("met", "met", ""),
        ],
    )


if __name__ == "__main__":
    main()

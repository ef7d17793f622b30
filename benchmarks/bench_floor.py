"""compare_models against its floor: a forward-only pass of the same images through the same models.

The floor runs every minibatch through the ViT and the ResNet under torch.no_grad in eval mode, with the batch size
compare_models uses. compare_models with its defaults adds the Gram of every monitored layer, the HSIC of every layer
pair (intra ViT, ViT x ResNet and intra ResNet) with 19 permutation-null products and the per-minibatch terms of the
jackknife, the attention distances and entropies, per-head CKA against the ResNet, skip-connection ratios and
effective ranks. One row per analysis on top of CKA alone, and one with everything on (localization and linear probes
too, on random labels), tell what each costs.
"""

import torch
from common import (
    CLOCKS,
    MANY_LAYERS,
    SETTINGS,
    Workload,
    build_models,
    describe,
    parse,
    parser,
    primary_clock,
    print_table,
    random_images,
    round_ratios,
    save,
    summary,
    time_interleaved,
)
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_cka import compare_models, find_layers
from lightning_cka.analyses import (
    AttentionStats,
    EffectiveRank,
    HeadCKA,
    LayerCKA,
    LinearProbe,
    Localization,
    ResidualRatio,
)

# Slowdown over the floor: the default analyses (residual block layers), and every analysis on; a minibatch of 1024
# (the paper's size) is a setting of its own (--batch-size 1024 --num-images 1024).
TARGETS = {"cpu": 1.10, "gpu": 1.10}
EVERYTHING_TARGETS = {"cpu": 1.25, "gpu": 1.25}
LARGE_MINIBATCH = 1024
LARGE_MINIBATCH_TARGET = 1.5

# name -> (the analyses, built afresh for every call since an analysis binds to its models, and the ViT layers)
VARIANTS = {
    "compare_models (default analyses)": (lambda: None, "auto"),
    "CKA alone, no null": (lambda: [LayerCKA(permutations=0)], "auto"),
    "CKA alone, with its null": (lambda: [LayerCKA()], "auto"),
    "CKA + attention": (lambda: [LayerCKA(), AttentionStats()], "auto"),
    "CKA + attention + heads": (lambda: [LayerCKA(), AttentionStats(), HeadCKA()], "auto"),
    "CKA + residual": (lambda: [LayerCKA(), ResidualRatio()], "auto"),
    "CKA + rank": (lambda: [LayerCKA(), EffectiveRank()], "auto"),
    "CKA + localization": (lambda: [LayerCKA(), Localization()], "auto"),
    "CKA + linear probe": (lambda: [LayerCKA(), LinearProbe()], "auto"),
    "everything on": (lambda: ["default", "localization", "linear_probe"], "auto"),
    "default analyses, many layers": (lambda: None, MANY_LAYERS),
}


def forward_only(models: list[nn.Module], images: Tensor, batch_size: int) -> Workload:
    def call() -> None:
        with torch.no_grad():
            for batch in images.split(batch_size):
                for model in models:
                    model(batch)

    return lambda: call


def probe(vit: nn.Module, resnet: nn.Module, data: object, batch_size: int, analyses, layers) -> Workload:
    def build():
        made = analyses()
        return lambda: compare_models(vit, resnet, data=data, batch_size=batch_size, analyses=made, layers_a=layers)

    return build


def main() -> None:
    cli = parser(__doc__, repeats=7)
    cli.add_argument("--batch-size", type=int, help="minibatch size (default: the preset's)")
    cli.add_argument("--num-images", type=int, help="probe images (default: the preset's)")
    cli.add_argument("--workloads", nargs="+", choices=list(VARIANTS), help="a subset of the rows (default: all)")
    args = parse(cli)
    setting = SETTINGS[args.preset]
    batch = args.batch_size or setting.batch_size
    num_images = args.num_images or setting.num_images
    vit, resnet = build_models(setting, args.device)
    images = random_images(num_images, setting.img_size, args.device)
    labels = torch.randint(0, 10, (num_images,), generator=torch.Generator().manual_seed(0)).to(args.device)
    data = TensorDataset(images, labels)
    variants = {name: VARIANTS[name] for name in (args.workloads or VARIANTS)}
    workloads = {"forward only": forward_only([vit, resnet], images, batch)}
    workloads |= {name: probe(vit, resnet, data, batch, *spec) for name, spec in variants.items()}
    print(describe(args.device))
    times, failures = time_interleaved(workloads, args.repeats, args.device)
    if failures:
        raise RuntimeError(f"a workload failed: {failures}")

    clock = primary_clock(args.device)
    floor = times["forward only"]
    targets = {
        "compare_models (default analyses)": TARGETS[args.preset],
        "everything on": EVERYTHING_TARGETS[args.preset],
    }
    if batch >= LARGE_MINIBATCH:
        targets = {"compare_models (default analyses)": LARGE_MINIBATCH_TARGET}
    rows = [{"workload": "forward only", "seconds": {c: summary(floor[c]) for c in CLOCKS}}]
    for name, (_, spec) in variants.items():
        rows.append(
            {
                "workload": name,
                "layers": f"{len(find_layers(vit, spec))} + {len(find_layers(resnet))}",
                "seconds": {c: summary(times[name][c]) for c in CLOCKS},
                "ratio": {c: round_ratios(times[name][c], floor[c]) for c in CLOCKS},
                "target": targets.get(name),
            }
        )
    for row in rows:
        ratio = row.get("ratio")
        row["met"] = None if row.get("target") is None else ("yes" if ratio[clock]["median"] <= row["target"] else "NO")
    default_shape = batch == setting.batch_size and num_images == setting.num_images
    name = "bench_floor" if default_shape else f"bench_floor_batch{batch}_images{num_images}"
    path = save(name, args, rows, setting=setting, batch_size=batch, num_images=num_images, clock=clock)

    def spread(values: dict) -> str:
        return f"{values['min']:.3f}-{values['max']:.3f}"

    flat = [
        {
            **row,
            "cpu": row["seconds"]["cpu"]["median"],
            "cpu_spread": spread(row["seconds"]["cpu"]),
            "wall": row["seconds"]["wall"]["median"],
            "ratio_cpu": row["ratio"]["cpu"]["median"] if "ratio" in row else None,
            "ratio_cpu_range": spread(row["ratio"]["cpu"]) if "ratio" in row else None,
            "ratio_wall": row["ratio"]["wall"]["median"] if "ratio" in row else None,
            "ratio_wall_range": spread(row["ratio"]["wall"]) if "ratio" in row else None,
        }
        for row in rows
    ]
    print_table(
        f"compare_models vs forward only: {setting.vit} at {setting.img_size} px + {setting.resnet}, "
        f"{num_images} images, batch {batch}, median of {args.repeats} rounds; targets on {clock} time "
        f"(written to {path})",
        flat,
        [
            ("workload", "workload", ""),
            ("layers (ViT + ResNet)", "layers", ""),
            ("CPU s", "cpu", ".3f"),
            ("CPU min-max", "cpu_spread", ""),
            ("wall s", "wall", ".3f"),
            ("x forward, CPU", "ratio_cpu", ".3f"),
            ("CPU min-max", "ratio_cpu_range", ""),
            ("x forward, wall", "ratio_wall", ".3f"),
            ("wall min-max", "ratio_wall_range", ""),
            ("target", "target", ".2f"),
            ("met", "met", ""),
        ],
    )


if __name__ == "__main__":
    main()

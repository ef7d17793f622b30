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
    MANY_LAYERS,
    SETTINGS,
    Workload,
    build_models,
    describe,
    parse,
    parser,
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

# Slowdown over the floor: the default analyses (residual block layers), and every analysis on.
TARGETS = {"cpu": 1.2, "gpu": 1.10}
EVERYTHING_TARGETS = {"cpu": 1.5, "gpu": 1.3}
ALONE = {"attention": False, "heads": False, "residual": False, "rank": False}


def forward_only(models: list[nn.Module], images: Tensor, batch_size: int) -> Workload:
    def call() -> None:
        with torch.no_grad():
            for batch in images.split(batch_size):
                for model in models:
                    model(batch)

    return lambda: call


def probe(vit: nn.Module, resnet: nn.Module, data: object, batch_size: int, **kwargs: object) -> Workload:
    return lambda: lambda: compare_models(vit, resnet, data=data, batch_size=batch_size, **kwargs)


def main() -> None:
    args = parse(parser(__doc__, repeats=7))
    setting = SETTINGS[args.preset]
    vit, resnet = build_models(setting, args.device)
    images = random_images(setting.num_images, setting.img_size, args.device)
    batch = setting.batch_size
    labels = torch.randint(0, 10, (images.shape[0],), generator=torch.Generator().manual_seed(0)).to(args.device)
    data = TensorDataset(images, labels)
    variants = {  # name -> (compare_models kwargs, ViT layer spec)
        "compare_models (default analyses)": ({}, "auto"),
        "CKA alone, no null": ({**ALONE, "permutations": 0}, "auto"),
        "CKA alone, with its null": (ALONE, "auto"),
        "CKA + attention": ({**ALONE, "attention": "auto"}, "auto"),
        "CKA + attention + heads": ({**ALONE, "attention": "auto", "heads": "auto"}, "auto"),
        "CKA + residual": ({**ALONE, "residual": "auto"}, "auto"),
        "CKA + rank": ({**ALONE, "rank": True}, "auto"),
        "CKA + localization": ({**ALONE, "localization": True}, "auto"),
        "CKA + linear probe": ({**ALONE, "linear_probe": True}, "auto"),
        "everything on": ({"localization": True, "linear_probe": True}, "auto"),
        "default analyses, many layers": ({"layers_a": MANY_LAYERS}, MANY_LAYERS),
    }
    workloads = {"forward only": forward_only([vit, resnet], images, batch)}
    workloads |= {name: probe(vit, resnet, data, batch, **kwargs) for name, (kwargs, _) in variants.items()}
    print(describe(args.device))
    times, failures = time_interleaved(workloads, args.repeats, args.device)
    if failures:
        raise RuntimeError(f"a workload failed: {failures}")

    floor = times["forward only"]
    rows = [{"workload": "forward only", "seconds": summary(floor)}]
    for name, (_, spec) in variants.items():
        rows.append(
            {
                "workload": name,
                "layers": f"{len(find_layers(vit, spec))} + {len(find_layers(resnet))}",
                "seconds": summary(times[name]),
                "ratio": round_ratios(times[name], floor),
                "target": {"compare_models (default analyses)": TARGETS, "everything on": EVERYTHING_TARGETS}.get(
                    name, {}
                ).get(args.preset),
            }
        )
    for row in rows:
        ratio = row.get("ratio")
        row["met"] = None if row.get("target") is None else ("yes" if ratio["median"] <= row["target"] else "NO")
    path = save("bench_floor", args, rows, setting=setting)
    flat = [
        {
            **row,
            "seconds": row["seconds"]["median"],
            "spread": f"{row['seconds']['min']:.2f}-{row['seconds']['max']:.2f}",
            "ratio": row["ratio"]["median"] if "ratio" in row else None,
            "ratio_range": f"{row['ratio']['min']:.3f}-{row['ratio']['max']:.3f}" if "ratio" in row else None,
        }
        for row in rows
    ]
    print_table(
        f"compare_models vs forward only: {setting.vit} at {setting.img_size} px + {setting.resnet}, "
        f"{setting.num_images} images, batch {batch}, median of {args.repeats} (written to {path})",
        flat,
        [
            ("workload", "workload", ""),
            ("layers (ViT + ResNet)", "layers", ""),
            ("median s", "seconds", ".3f"),
            ("min-max s", "spread", ""),
            ("x forward (median of rounds)", "ratio", ".3f"),
            ("x forward min-max", "ratio_range", ""),
            ("target", "target", ".2f"),
            ("met", "met", ""),
        ],
    )


if __name__ == "__main__":
    main()

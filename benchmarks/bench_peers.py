"""lightning-cka against torch-cka 0.21 and ckatorch 1.0.3: same models, images and minibatches, in one run.

Each tool computes the ViT-vs-ViT (intra) and ViT-vs-ResNet (cross) CKA matrices of the residual blocks, called as its
README shows, with a DataLoader over the same images (shuffle=False, so every tool sees the same minibatches; one pass:
ckatorch's default of 10 epochs would repeat the same work). The peers never remove their hooks, so every run gets
fresh copies of the models, made outside the timed and measured region. lightning-cka's compare_models computes
intra, cross and ResNet-vs-ResNet in one call, with the peers' work only (no null, no other analysis; its
per-minibatch jackknife terms come for free); what its other analyses cost is bench_floor.py's question.
"""

import contextlib
import copy
import os
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers draw progress bars; tqdm reads this when imported

import numpy as np
import torch
from ckatorch import CKA as CkaTorch
from common import (
    CLOCKS,
    MIB,
    SETTINGS,
    build_models,
    describe,
    parse,
    parser,
    peak_memory,
    primary_clock,
    print_table,
    random_images,
    save,
    summary,
    time_interleaved,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch_cka import CKA as TorchCka

from lightning_cka import MinibatchCKA, compare_models, find_layers
from lightning_cka.analyses import LayerCKA

# What the peers compute: CKA matrices only (no null, no other analysis), built afresh for every call.
CKA_ONLY = lambda: [LayerCKA(permutations=0)]  # noqa: E731

# The peers' advice on their own usage; shuffle=False and one DataLoader are deliberate here.
warnings.filterwarnings("ignore", message=".*(Dataloader for Model 2|setting 'shuffle=True').*")

TARGET_SPEEDUP = 3.0  # lightning-cka at least this much faster than the faster peer (GPU setting)
TOOLS = ("lightning-cka", "torch-cka", "torch-cka (no_grad)", "ckatorch")
NOTES = {
    "lightning-cka": "minibatch CKA (Nguyen et al.): unbiased HSIC summed over all minibatches, from centered Grams "
    "summed in float64; one call gives intra, cross and ResNet intra",
    "torch-cka": "the same estimator, from uncentered float32 Grams, one pair at a time with host syncs, "
    "without torch.no_grad (as its README calls it: the outputs keep their autograd graphs)",
    "torch-cka (no_grad)": "torch-cka called inside torch.no_grad(): the fair comparison of the computation",
    "ckatorch": "a different quantity for (B, T, D) outputs: per-image token x token Grams, and only the last "
    "minibatch counts (each minibatch overwrites the matrix); 4-D conv maps fail",
}


def call(tool: str, matrix: str, vit: nn.Module, resnet: nn.Module, images: Tensor, batch_size: int) -> object:
    """A call computing one tool's matrix: ``"intra"``, ``"cross"``, or ``"both"`` for lightning-cka.

    The peers never remove their hooks, so they get fresh copies of the models each time this is built.
    """
    device = images.device
    if tool == "lightning-cka":
        other = None if matrix == "intra" else resnet
        return lambda: compare_models(vit, other, data=images, batch_size=batch_size, analyses=CKA_ONLY())
    if tool == "forward only":

        def forward() -> None:
            with torch.no_grad():
                for batch in images.split(batch_size):
                    vit(batch)
                    resnet(batch)

        return forward
    first = copy.deepcopy(vit)
    second = first if matrix == "intra" else copy.deepcopy(resnet)
    first_layers, second_layers = find_layers(vit), find_layers(second)
    loader = DataLoader(TensorDataset(images), batch_size=batch_size, shuffle=False)
    if tool.startswith("torch-cka"):
        # As in torch-cka's README: build, compare(dataloader), export()["CKA"]; the fair variant under no_grad.
        cka = TorchCka(first, second, "vit", "other", first_layers, second_layers, device=str(device))

        def compare() -> np.ndarray:
            with torch.no_grad() if tool.endswith("(no_grad)") else contextlib.nullcontext():
                cka.compare(loader)
            return cka.export()["CKA"].cpu().numpy()

        return compare
    # As in ckatorch's examples: build, then call with the dataloader.
    cka = CkaTorch(first, second, first_layers, second_layers, "vit", "other", device=device)
    return lambda: cka(loader, epochs=1).cpu().numpy()


def memory_task(tool: str, matrix: str, preset: str, device: torch.device) -> object:
    """``call`` for a fresh process: builds the models and images first."""
    setting = SETTINGS[preset]
    vit, resnet = build_models(setting, device)
    images = random_images(setting.num_images, setting.img_size, device)
    return call(tool, matrix, vit, resnet, images, setting.batch_size)


def matrices(result: object, matrix: str) -> dict[str, np.ndarray]:
    """``{"intra": ..., "cross": ...}`` from a CKAResult, or ``{matrix: ...}`` from a peer's matrix."""
    if isinstance(result, np.ndarray):
        return {matrix: result}
    if result.reference is None or not np.size(result.reference):  # no reference: no cross matrix (None since 0.2)
        return {"intra": result.intra}
    return {"intra": result.intra, "cross": result.reference}


def per_image_token_cka(vit: nn.Module, layers: list[str], batch: Tensor) -> np.ndarray:
    """What ckatorch computes for ``(B, T, D)`` outputs, rebuilt from lightning-cka's estimator.

    The tokens of each image are the examples and HSIC₁ is summed over the images of one minibatch: each image's
    token Grams are one update of ``MinibatchCKA``.
    """
    outputs: dict[str, Tensor] = {}
    modules = dict(vit.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
        for name in layers
    ]
    with torch.no_grad():
        vit(batch)
    for handle in handles:
        handle.remove()
    tokens = [outputs[name].double() for name in layers]
    grams = torch.stack([t @ t.mT for t in tokens], dim=1)  # (B, L, T, T)
    metric = MinibatchCKA().to(batch.device)
    for image in grams:
        metric.update(image, grams=True)
    return metric.compute().cpu().numpy()


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float | None:
    common_keys = a.keys() & b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in common_keys) if common_keys else None


def main() -> None:
    args = parse(parser(__doc__, repeats=5))
    setting = SETTINGS[args.preset]
    vit, resnet = build_models(setting, args.device)
    images = random_images(setting.num_images, setting.img_size, args.device)
    batch = setting.batch_size
    print(describe(args.device))

    jobs = [("forward only", "both"), ("lightning-cka", "intra"), ("lightning-cka", "both")]
    jobs += [(tool, matrix) for tool in TOOLS[1:] for matrix in ("intra", "cross")]
    results: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def workload(tool: str, matrix: str) -> object:
        run = call(tool, matrix, vit, resnet, images, batch)

        def timed_call() -> None:
            output = run()
            if output is not None:
                results[tool, matrix] = matrices(output, matrix)

        return timed_call

    labels = {"intra": "intra", "cross": "cross", "both": "intra + cross"}
    names = {job: f"{job[0]} {labels[job[1]]}" for job in jobs}
    names["forward only", "both"] = "forward only (ViT + ResNet)"
    times, failures = time_interleaved(
        {names[job]: (lambda job=job: workload(*job)) for job in jobs}, args.repeats, args.device
    )
    peaks: dict[tuple[str, str], float | str] = {}
    for job in jobs:
        if names[job] in failures:
            continue
        try:
            peaks[job] = peak_memory(memory_task, *job, args.preset, args.device, device=args.device) / MIB
        except Exception as err:  # out of memory in the measuring process is a result too
            peaks[job] = f"failed: {type(err).__name__}"

    double = copy.deepcopy(vit).double(), copy.deepcopy(resnet).double()
    reference = matrices(compare_models(*double, data=images.double(), batch_size=batch, analyses=CKA_ONLY()), "both")
    ours = results["lightning-cka", "both"]
    last_batch = images[(len(images) - 1) // batch * batch :]
    ckatorch_quantity = {"intra": per_image_token_cka(vit, find_layers(vit), last_batch)}

    rows = []
    for tool, matrix in jobs:
        name = names[tool, matrix]
        row = {"workload": name, "tool": tool, "matrix": matrix, "note": NOTES.get(tool)}
        if name in failures:
            rows.append({**row, "status": f"failed: {failures[name]}"})
            continue
        seconds = {c: summary(times[name][c]) for c in CLOCKS}
        row |= {"seconds": seconds, "peak_mib": peaks.get((tool, matrix)), "status": "ok"}
        if (tool, matrix) in results:
            found = results[tool, matrix]
            row |= {"max_diff_vs_ours": max_diff(found, ours), "max_diff_vs_float64": max_diff(found, reference)}
        if tool == "ckatorch" and matrix == "intra":
            row["max_diff_vs_per_image_token_cka"] = max_diff(results[tool, matrix], ckatorch_quantity)
        rows.append(row)

    # Speed: each peer against lightning-cka computing the same matrices in the same round.
    clock = primary_clock(args.device)
    ours_time = {"intra": times["lightning-cka intra"][clock], "both": times["lightning-cka intra + cross"][clock]}
    speedups = []
    for tool in TOOLS[1:]:
        intra, cross = times[f"{tool} intra"][clock], times[f"{tool} cross"][clock]
        if intra:
            speedups.append((f"{tool} intra", [p / o for p, o in zip(intra, ours_time["intra"], strict=True)]))
        if intra and cross:
            both = [a + b for a, b in zip(intra, cross, strict=True)]
            speedups.append((f"{tool} intra + cross", [p / o for p, o in zip(both, ours_time["both"], strict=True)]))
    speed_rows = [{"peer": name, "slower_than_lightning_cka": summary(values)} for name, values in speedups]
    closest = min((row["slower_than_lightning_cka"]["median"] for row in speed_rows), default=None)
    target = {
        "target_speedup": TARGET_SPEEDUP,
        "closest_peer_ratio": closest,
        "met": None if closest is None else closest >= TARGET_SPEEDUP,
    }
    matrices_found = {names[job]: found for job, found in results.items()}
    extra = {
        "setting": setting,
        "clock": clock,
        "speedups": speed_rows,
        "target": target,
        "notes": NOTES,
        "matrices": matrices_found,
    }
    path = save("bench_peers", args, rows, **extra)

    title = (
        f"Peers: {setting.vit} at {setting.img_size} px + {setting.resnet}, {setting.num_images} images, "
        f"batch {batch}, median of {args.repeats} (written to {path})"
    )
    flat = [
        {
            **row,
            "seconds": row["seconds"][clock]["median"] if "seconds" in row else None,
            "spread": (
                f"{row['seconds'][clock]['min']:.2f}-{row['seconds'][clock]['max']:.2f}" if "seconds" in row else None
            ),
            "wall": row["seconds"]["wall"]["median"] if "seconds" in row else None,
            "vs_token": row.get("max_diff_vs_per_image_token_cka"),
        }
        for row in rows
    ]
    print_table(
        title,
        flat,
        [
            ("workload", "workload", ""),
            (f"median {clock} s", "seconds", ".3f"),
            ("min-max", "spread", ""),
            ("median wall s", "wall", ".3f"),
            ("peak MiB", "peak_mib", ".1f"),
            ("max |Δ| vs lightning-cka", "max_diff_vs_ours", ".2e"),
            ("max |Δ| vs float64", "max_diff_vs_float64", ".2e"),
            ("max |Δ| vs per-image token CKA", "vs_token", ".2e"),
            ("status", "status", ""),
        ],
    )
    print_table(
        f"Peer time / lightning-cka time for the same matrices, {clock} time, per round "
        f"(target on the GPU setting: >= {TARGET_SPEEDUP:g})",
        [{"peer": r["peer"], **r["slower_than_lightning_cka"]} for r in speed_rows],
        [("peer", "peer", ""), ("median", "median", ".2f"), ("min", "min", ".2f"), ("max", "max", ".2f")],
    )


if __name__ == "__main__":
    main()

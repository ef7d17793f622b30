"""What the linear probe adds to a probe: ProbeEngine with [LayerCKA] vs [LayerCKA, LinearProbe] vs the forward alone.

    python benchmarks/bench_linear_probe.py                      # CPU: vit_tiny_patch16_224 at 96 px, 256 images
    python benchmarks/bench_linear_probe.py --device cuda --model vit_base_patch16_224 --img-size 224 --images 1024 \
        --batch 256

Random weights, random images, random labels (the cost does not depend on them). The three workloads run interleaved,
``--repeats`` times each after one warm-up; the table gives medians and the ratios to the forward pass. A quick
timing, not a test.
"""

import argparse
import statistics
import time

import timm
import torch

from lightning_cka.analyses.layer_cka import LayerCKA
from lightning_cka.analyses.linear_probe import LinearProbe
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
from lightning_cka.engine.options import ProbeOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, img_size=args.img_size).to(device).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, args.img_size, args.img_size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.images,), generator=g)
    batches = [
        ProbeBatch(i, start, images[start : start + args.batch], labels[start : start + args.batch])
        for i, start in enumerate(range(0, args.images, args.batch))
    ]
    options = ProbeOptions(linear_probe=True)
    engines = {
        "LayerCKA": ProbeEngine([ProbedModel("model", model)], [LayerCKA(options)]),
        "LayerCKA + LinearProbe": ProbeEngine([ProbedModel("model", model)], [LayerCKA(options), LinearProbe(options)]),
    }

    def forward() -> None:
        with torch.no_grad():
            for batch in batches:
                model(batch.inputs)

    def probe(engine: ProbeEngine):
        def call() -> None:
            engine.run(batches, len(batches), device)
            engine.compute()

        return call

    workloads = {"forward only (no_grad, eval)": forward, **{name: probe(e) for name, e in engines.items()}}
    times: dict[str, list[float]] = {name: [] for name in workloads}
    for repeat in range(args.repeats + 1):
        for name, call in workloads.items():
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    layers = len(engines["LayerCKA"].models["model"].layers)
    dim = model.embed_dim
    kept = args.images // 2 * dim * layers * 2 * 4
    stats = layers * 2 * (dim * dim + dim * args.classes + dim) * 8
    print(
        f"{args.model} at {args.img_size} px, {args.images} images in minibatches of {args.batch}, {args.classes} "
        f"classes, {layers} layers of width {dim}, {device.type}, {torch.get_num_threads()} CPU threads, "
        f"median of {args.repeats}"
    )
    print(f"linear probe state: scored half kept {kept / 2**20:.1f} MiB, sufficient statistics {stats / 2**20:.1f} MiB")
    base = statistics.median(times["forward only (no_grad, eval)"])
    cka = statistics.median(times["LayerCKA"])
    print("\n| workload | median s | min s | / forward | / LayerCKA |\n| --- | --- | --- | --- | --- |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {min(values):.3f} | {median / base:.2f} | {median / cka:.2f} |")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()

"""What residual ratios and localization add to a probe: [LayerCKA] vs [LayerCKA, X] vs the forward alone.

    python benchmarks/bench_residual_localization.py --threads 1          # CPU: vit_tiny_patch16_224 at 96 px
    python benchmarks/bench_residual_localization.py --device cuda --model vit_base_patch16_224 --img-size 224 \
        --images 1024 --batch 128

The model is probed with a frozen ResNet-18 reference (``--reference ''`` for none). Two kinds of probe are timed:
``first`` (a fresh engine: the reference runs and its taps are cached) and ``later`` (the same engine again: the
reference comes from its cache, as at every probe after the first during training). Random weights and images (the
cost does not depend on them); default options (19 permutations of the null). The workloads run interleaved,
``--repeats`` times each after one warm-up; the table gives the median wall time and the median CPU time of this
process (on a shared CPU machine other work stretches the wall time but not this process's CPU time, which with
``--threads 1`` is the steadier estimate), each with its ratio to the bare forward pass of the model
(``torch.no_grad``, eval). A quick timing, not a test.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch

from lightning_cka.analyses.layer_cka import LayerCKA
from lightning_cka.analyses.localization import Localization
from lightning_cka.analyses.residual import ResidualRatio
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
from lightning_cka.engine.options import ProbeOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--reference", default="resnet18")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, img_size=args.img_size).to(device).eval()
    reference = timm.create_model(args.reference).to(device).eval() if args.reference else None
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, args.img_size, args.img_size, generator=g).to(device)
    batches = [
        ProbeBatch(i, start, images[start : start + args.batch])
        for i, start in enumerate(range(0, args.images, args.batch))
    ]
    options = ProbeOptions(residual=True, localization=True)
    suites: dict[str, Callable[[], list]] = {
        "LayerCKA": lambda: [LayerCKA(options)],
        "LayerCKA + ResidualRatio": lambda: [LayerCKA(options), ResidualRatio(options)],
        "LayerCKA + Localization": lambda: [LayerCKA(options), Localization(options)],
    }

    def engine(analyses: list) -> ProbeEngine:
        models = [ProbedModel("model", model)]
        if reference is not None:
            models.append(ProbedModel("reference", reference, frozen=True))
        return ProbeEngine(models, analyses)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn: Callable[[], None]) -> tuple[float, float]:
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - start, time.process_time() - cpu

    def forward(with_reference: bool) -> None:
        with torch.no_grad():
            for batch in batches:
                model(batch.inputs)
                if with_reference and reference is not None:
                    reference(batch.inputs)

    def probe(target: ProbeEngine) -> None:
        target.run(batches, len(batches), device)
        target.compute()

    later = {name: engine(make()) for name, make in suites.items()}
    workloads: dict[str, Callable[[], None]] = {
        "forward (model)": lambda: forward(False),
        "forward (model + reference)": lambda: forward(True),
    }
    for name, make in suites.items():
        workloads[f"{name}, first"] = lambda make=make: probe(engine(make()))
        workloads[f"{name}, later"] = lambda name=name: probe(later[name])
    for fn in workloads.values():  # warm-up (also fills the later engines' reference caches)
        fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in workloads}
    for _ in range(args.repeats):
        for name, fn in workloads.items():
            times[name].append(timed(fn))
    print(
        f"{args.model} at {args.img_size} px, reference {args.reference or 'none'}, {args.images} images, batch "
        f"{args.batch}, {args.device}, {torch.get_num_threads()} thread(s); {args.repeats} repeats"
    )
    print("| workload | wall s | x forward | CPU s | x forward |\n| --- | --- | --- | --- | --- |")
    wall = {name: statistics.median(t for t, _ in values) for name, values in times.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in times.items()}
    for name in times:
        base_wall, base_cpu = wall["forward (model)"], cpu["forward (model)"]
        print(
            f"| {name} | {wall[name]:.3f} | {wall[name] / base_wall:.2f} | {cpu[name]:.3f} | "
            f"{cpu[name] / base_cpu:.2f} |"
        )
    for kind in ("first", "later"):
        for extra in ("ResidualRatio", "Localization"):
            name, cka = f"LayerCKA + {extra}, {kind}", f"LayerCKA, {kind}"
            print(
                f"{kind} probe, + {extra}: wall {wall[name] - wall[cka]:+.3f} s ({wall[name] / wall[cka]:.2f}x "
                f"LayerCKA alone), CPU {cpu[name] - cpu[cka]:+.3f} s ({cpu[name] / cpu[cka]:.2f}x)"
            )


if __name__ == "__main__":
    main()

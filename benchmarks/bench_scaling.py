"""The CKA math alone, Grams given, as the number of layers L and the minibatch size n grow.

Times lightning_cka.functional.hsic._pairwise_hsic on a stacked (L, n, n) float32 tensor and MinibatchCKA.update on a
list of L Grams (it stacks them, then does the same). FLOPs counted: 2·L²·n² for the HSIC product (one multiply-add
per pair of layers and Gram entry; the full product is formed, not only one triangle) plus 4·L·n² for the centering
(row sums, then subtracting row and column terms and adding the total). The Grams are uniform random numbers:
the time does not depend on their values. The float64 matrix-product rate of this machine is measured too, as the
ceiling to compare against.
"""

import time

import torch
from common import (
    describe,
    parse,
    parser,
    primary_clock,
    print_table,
    release_memory,
    save,
    summary,
    synchronize,
    time_interleaved,
)

from lightning_cka import MinibatchCKA
from lightning_cka.functional.hsic import _pairwise_hsic

LAYERS = (12, 48, 192)
SIZES = (256, 1024, 4096)
MAX_SECONDS = 300.0  # skip a combination whose timed calls would take longer than this


def flops(layers: int, n: int) -> float:
    return 2.0 * layers**2 * n**2 + 4.0 * layers * n**2


def gemm_rate(device: torch.device, repeats: int = 3) -> float:
    """Best float64 matrix-product FLOP/s; large enough on a GPU that launch latency does not lower the ceiling."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.rand(size, size, dtype=torch.float64, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        a @ a
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable"))


def main() -> None:
    args = parse(parser(__doc__, repeats=3))
    print(describe(args.device))
    ceiling = gemm_rate(args.device)
    print(f"float64 matrix product: {ceiling / 1e9:.1f} GFLOP/s")
    rows = []
    for layers in LAYERS:
        for n in SIZES:
            gram_bytes = layers * n**2 * 4
            # The 256 MiB float64 block of _pairwise_hsic comes on top of the Grams, for both.
            needed = {"_pairwise_hsic": gram_bytes + 2**28, "MinibatchCKA.update": gram_bytes + 2**28}
            predicted = flops(layers, n) / ceiling * (args.repeats + 1)
            row = {"layers": layers, "n": n, "gram_gib": gram_bytes / 2**30, "gflop": flops(layers, n) / 1e9}
            if predicted > MAX_SECONDS:
                for fn in needed:
                    rows.append(
                        {**row, "function": fn, "status": f"skipped: predicted {predicted:.0f} s > {MAX_SECONDS:.0f} s"}
                    )
                continue
            free = available_bytes(args.device)
            fits = [fn for fn, size in needed.items() if size < 0.8 * free]
            for fn in needed.keys() - fits:
                rows.append({**row, "function": fn, "status": f"skipped: needs {needed[fn] / 2**30:.1f} GiB"})
            if not fits:
                continue
            grams = torch.rand(layers, n, n, device=args.device)

            def update(grams: torch.Tensor = grams) -> object:
                metric, gram_list = MinibatchCKA().to(grams.device), list(grams)
                return lambda: metric.update(gram_list, grams=True)

            workloads = {
                "_pairwise_hsic": lambda grams=grams: lambda: _pairwise_hsic(grams),
                "MinibatchCKA.update": update,
            }
            times, failures = time_interleaved({fn: workloads[fn] for fn in fits}, args.repeats, args.device)
            for fn in fits:
                if fn in failures:
                    rows.append({**row, "function": fn, "status": f"failed: {failures[fn]}"})
                    continue
                seconds = summary(times[fn][primary_clock(args.device)])
                rate = flops(layers, n) / seconds["median"]
                rows.append(
                    {
                        **row,
                        "function": fn,
                        "status": "ok",
                        "seconds": seconds,
                        "gflops_per_s": rate / 1e9,
                        "fraction_of_gemm": rate / ceiling,
                        "gram_gb_per_s": gram_bytes / seconds["median"] / 1e9,
                    }
                )
            del grams
            release_memory(args.device)  # cached CUDA blocks would count as used in the next size check
            print(f"L={layers} n={n} done")
    path = save("bench_scaling", args, rows, gemm_gflops_per_s=ceiling / 1e9)
    flat = [{**row, "seconds": row["seconds"]["median"] if "seconds" in row else None} for row in rows]
    print_table(
        f"CKA math on given Grams, median of {args.repeats}; float64 matrix product on this machine: "
        f"{ceiling / 1e9:.1f} GFLOP/s (written to {path})",
        flat,
        [
            ("function", "function", ""),
            ("L", "layers", "d"),
            ("n", "n", "d"),
            ("Grams GiB", "gram_gib", ".3f"),
            ("GFLOP", "gflop", ".2f"),
            ("median s", "seconds", ".4f"),
            ("GFLOP/s", "gflops_per_s", ".2f"),
            ("of fp64 matmul", "fraction_of_gemm", ".0%"),
            ("Gram GB/s read", "gram_gb_per_s", ".2f"),
            ("status", "status", ""),
        ],
    )


if __name__ == "__main__":
    main()

"""The permutation null against the CKA product it comes with: HSIC terms of one minibatch, with and without the null.

For L layers (model and reference together, as LayerCKA hands them to MinibatchCKA) and minibatch sizes n, times
_hsic_terms on the centered Grams of random features: without permutations (the CKA product: the HSIC of every layer
pair), with 19 permutations as MinibatchCKA draws them (cyclic shifts of a random order, one FFT for all), and with 19
uniformly random permutations (one gathered product each, what minibatches of at most 19 examples use). The null's
cost is the time with permutations minus the time without, divided by the time without, per round.
"""

import torch
from common import CLOCKS, describe, parse, parser, primary_clock, print_table, round_ratios, save, summary
from common import time_interleaved as interleave

from lightning_cka.functional.hsic import _hsic_terms, draw_permutations, gram

TARGET = 3.0  # the null of 19 permutations at most 3x the CKA product


def main() -> None:
    cli = parser(__doc__, repeats=7)
    cli.add_argument("--layers", type=int, nargs="+", default=[20, 32], help="layers (20: ViT-Ti 12 + ResNet-18 8)")
    cli.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    cli.add_argument("--uniform-up-to", type=int, default=256, help="largest n timed with uniform permutations too")
    args = parse(cli)
    clock = primary_clock(args.device)
    print(describe(args.device))
    rows = []
    for layers in args.layers:
        for n in args.sizes:
            generator = torch.Generator().manual_seed(n)
            features = torch.randn(n, 512, generator=generator).to(args.device)
            grams = [gram(torch.tanh(features * (1 + i / layers)), center=True) for i in range(layers)]
            shifts = draw_permutations(n, 19, generator, args.device)
            uniform = [torch.randperm(n, generator=generator).to(args.device) for _ in range(19)]
            workloads = {
                "product": lambda g=grams: lambda: _hsic_terms(g),
                "with shifted null": lambda g=grams, p=shifts: lambda: _hsic_terms(g, permutations=p),
            }
            if n <= args.uniform_up_to:  # one gathered product per permutation: slow, the comparison is at small n
                workloads["with uniform null"] = lambda g=grams, p=uniform: lambda: _hsic_terms(g, permutations=p)
            times, failures = interleave(workloads, args.repeats, args.device)
            if failures:
                raise RuntimeError(failures)
            seconds = {k: {c: summary(v[c]) for c in CLOCKS} for k, v in times.items()}
            row = {"layers": layers, "n": n, "seconds": seconds}
            for kind in ("shifted", "uniform") if n <= args.uniform_up_to else ("shifted",):
                extra = {
                    c: [a - b for a, b in zip(times[f"with {kind} null"][c], times["product"][c], strict=True)]
                    for c in CLOCKS
                }
                row[f"{kind}_null_ratio"] = {c: round_ratios(extra[c], times["product"][c]) for c in CLOCKS}
            row["met"] = "yes" if row["shifted_null_ratio"][clock]["median"] <= TARGET else "NO"
            rows.append(row)
            print(f"L={layers} n={n}: null {row['shifted_null_ratio'][clock]['median']:.2f}x the product", flush=True)
    path = save("bench_null", args, rows, target=TARGET, clock=clock)

    def cell(row: dict, key: str, clock: str) -> str | None:
        if key not in row:
            return None
        ratio = row[key][clock]
        return f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})"

    flat = [
        {
            "layers": r["layers"],
            "n": r["n"],
            "product_ms": 1e3 * r["seconds"]["product"][clock]["median"],
            "shifted_ms": 1e3 * r["seconds"]["with shifted null"][clock]["median"],
            "uniform_ms": 1e3 * r["seconds"]["with uniform null"][clock]["median"]
            if "with uniform null" in r["seconds"]
            else None,
            "shifted": cell(r, "shifted_null_ratio", clock),
            "shifted_wall": cell(r, "shifted_null_ratio", "wall"),
            "uniform": cell(r, "uniform_null_ratio", clock),
            "met": r["met"],
        }
        for r in rows
    ]
    print_table(
        f"The null of 19 permutations per minibatch against the CKA product, {clock} time, median (min-max) of "
        f"{args.repeats} rounds (written to {path})",
        flat,
        [
            ("L", "layers", "d"),
            ("n", "n", "d"),
            ("product ms", "product_ms", ".2f"),
            ("+ shifted null ms", "shifted_ms", ".2f"),
            ("+ uniform null ms", "uniform_ms", ".2f"),
            ("shifted null / product", "shifted", ""),
            ("(wall)", "shifted_wall", ""),
            ("uniform null / product", "uniform", ""),
            (f"<= {TARGET:g}", "met", ""),
        ],
    )


if __name__ == "__main__":
    main()

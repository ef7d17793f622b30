"""How the minibatch size of the CKA estimator trades estimator variance against jackknife blocks.

On a real trained model (the README demo's ViT, trained here first unless --checkpoint names one) and its data, many
independent probes of the same size are drawn; for each minibatch size the script reports, for the mean
off-diagonal CKA and for single cells:

- the spread of the estimate over independent probes (its true standard deviation at that probe size),
- the mean block-jackknife standard error that one probe reports for itself,
- the mean estimate (the minibatch estimator's bias shows as drift with the minibatch size).

A good default has a small spread, a jackknife error that tracks that spread (enough blocks), and no drift.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, describe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


def trained_model(checkpoint: str | None, out: Path) -> tuple[torch.nn.Module, str]:
    from lightning_cka.reference import load_reference

    if checkpoint is None:
        import train

        summary = train.main(["--out", str(out), "--cka-every", "0", "--name", "minibatch-size-model"])
        checkpoint = summary["checkpoint"]
    return load_reference(checkpoint), checkpoint


def digits_images() -> torch.Tensor:
    import image_data

    train_set, val_set, test_set, _ = image_data.digits_splits()
    return torch.cat([torch.stack([x for x, _ in split]) for split in (train_set, val_set, test_set)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a checkpoint of examples/train.py (default: train the demo first)")
    parser.add_argument("--probe-size", type=int, default=512)
    parser.add_argument("--draws", type=int, default=12, help="independent probes per minibatch size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lightning_cka import compare_models
    from lightning_cka.analyses import LayerCKA
    from lightning_cka.stats import jackknife_se, offdiag_mean

    local = RESULTS.parent / "results" / "local"
    model, checkpoint = trained_model(args.checkpoint, local)
    images = digits_images()
    print(describe(torch.device("cpu")))
    print(f"model {checkpoint}; {len(images)} digits images; probes of {args.probe_size}, {args.draws} draws each")
    rows = []
    for size in args.sizes:
        estimates, errors, cells, cell_errors, seconds = [], [], [], [], []
        for draw in range(args.draws):
            generator = torch.Generator().manual_seed(1000 + draw)
            probe = images[torch.randperm(len(images), generator=generator)[: args.probe_size]]
            start = time.perf_counter()
            result = compare_models(
                model,
                data=probe,
                batch_size=size,
                reduction="mean",
                analyses=[LayerCKA(permutations=0)],
            )
            seconds.append(time.perf_counter() - start)
            estimates.append(offdiag_mean(result.intra))
            errors.append(jackknife_se(offdiag_mean, result.intra_replicates))
            cells.append(result.intra[0, -1])
            cell_errors.append(result.intra_se[0, -1])
        rows.append(
            {
                "minibatch_size": size,
                "minibatches": -(-args.probe_size // size),
                "offdiag_mean": statistics.mean(estimates),
                "offdiag_sd_over_probes": statistics.stdev(estimates),
                "offdiag_mean_jackknife_se": statistics.mean(errors),
                "first_last_cka": statistics.mean(cells),
                "first_last_sd_over_probes": statistics.stdev(cells),
                "first_last_mean_jackknife_se": float(np.mean(cell_errors)),
                "seconds_median": statistics.median(seconds),
            }
        )
        row = rows[-1]
        print(
            f"batch {size:>4} ({row['minibatches']:>3} minibatches): offdiag {row['offdiag_mean']:.4f}, sd over "
            f"probes {row['offdiag_sd_over_probes']:.4f}, jackknife se {row['offdiag_mean_jackknife_se']:.4f}; "
            f"first-last cell {row['first_last_cka']:.4f} sd {row['first_last_sd_over_probes']:.4f} jackknife "
            f"{row['first_last_mean_jackknife_se']:.4f}; {row['seconds_median']:.2f} s"
        )
    out = RESULTS / "cpu" / "bench_minibatch_size.json"
    out.write_text(
        json.dumps(
            {"machine": describe(torch.device("cpu")), "checkpoint": checkpoint, "args": vars(args), "rows": rows},
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Where compare_models' default analyses spend their CPU time: one call profiled with cProfile (bench_floor's setting).

    python benchmarks/profile_floor.py [--batch-size 64] [--top 25]

One torch thread; one untimed warm-up call first. The table is sorted by each function's own time, so the models'
operators (convolutions, linear layers) and the package's (Grams, head Grams, norms, eigenvalues) appear side by side.
"""

import argparse
import cProfile
import io
import pstats
import time

import torch
from common import SETTINGS, build_models, random_images
from torch.utils.data import TensorDataset

from lightning_cka import compare_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--top", type=int, default=25, help="functions shown")
    args = parser.parse_args()
    torch.set_num_threads(1)
    setting = SETTINGS["cpu"]
    vit, resnet = build_models(setting, torch.device("cpu"))
    images = random_images(setting.num_images, setting.img_size, torch.device("cpu"))
    data = TensorDataset(images, torch.randint(0, 10, (len(images),), generator=torch.Generator().manual_seed(0)))
    compare_models(vit, resnet, data=data, batch_size=args.batch_size)  # warm-up
    profile = cProfile.Profile()
    start = time.process_time()
    profile.enable()
    compare_models(vit, resnet, data=data, batch_size=args.batch_size)
    profile.disable()
    seconds = time.process_time() - start
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
    print(f"compare_models, batch {args.batch_size}: {seconds:.3f} s CPU under the profiler\n{out.getvalue()}")


if __name__ == "__main__":
    main()

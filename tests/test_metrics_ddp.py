"""Two CPU processes (gloo), each updating on its share of the minibatches, agree with one process over all of them:
the CKA, its jackknife errors and replicates and the permutation null (the permutations follow the minibatch index)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_cka import MeanAttentionDistance, MinibatchCKA

NUM_BATCHES = 5  # odd: the ranks get different numbers of minibatches


def make_batch(i):
    g = torch.Generator().manual_seed(i)
    base = torch.randn(16, 6, generator=g)
    xs = [base, torch.tanh(base @ torch.randn(6, 20, generator=g)), torch.randn(16, 3, 2, 2, generator=g)]
    ys = [base.square(), torch.randn(16, 5, generator=g)]
    attn = torch.softmax(torch.randn(16, 3, 5, 5, generator=g), dim=-1)
    return xs, ys, attn


def metrics():
    return (
        MinibatchCKA(num_layers_a=3, num_minibatches=NUM_BATCHES, permutations=4),
        MinibatchCKA(num_layers_a=3, num_layers_b=2, num_minibatches=NUM_BATCHES, permutations=4),
        MeanAttentionDistance(num_layers=1, num_heads=3, grid_size=2, patch_size=8),
    )


def update(all_metrics, i):
    intra, cross, attention = all_metrics
    xs, ys, attn = make_batch(i)
    intra.update(xs, index=i)
    cross.update(xs, ys, index=i)
    attention.update(attn, layer=0)


def worker(rank, world_size, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        all_metrics = metrics()
        for i in range(rank, NUM_BATCHES, world_size):
            update(all_metrics, i)
        results = [m.compute() for m in all_metrics]
        results += [(m.estimate.se, m.estimate.null, m.estimate.replicates) for m in all_metrics[:2]]
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_sum_equals_single_process(tmp_path):
    out_file = tmp_path / "ddp.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    distributed = torch.load(out_file)

    single = metrics()
    for i in range(NUM_BATCHES):
        update(single, i)
    expected = [m.compute() for m in single]
    expected += [(m.estimate.se, m.estimate.null, m.estimate.replicates) for m in single[:2]]
    for got, want in zip(distributed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)

"""The monitor's cross-rank error protocol: before any rank reduces a probe, every rank learns what failed anywhere.

A probe runs on every rank; its reduction is collective, so a rank that skips an analysis another rank reduces would
wait forever. :func:`agree` is the one collective of the protocol: every rank sends what failed on it (the forward
pass, or single analyses) and every rank gets back the same account of all ranks, so all skip the same things.
"""

from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_cka.engine.analysis import describe_error as describe

FORWARD = ""  # the key of a failed forward pass in an account


@dataclass
class Account:
    """What failed on any rank in one probe.

    Attributes:
        forward: the failed forward passes, as ``"rank 1: RuntimeError(...)"`` (``""`` when none failed).
        analyses: per failed analysis, its errors in the same form.
    """

    forward: str = ""
    analyses: dict[str, str] = field(default_factory=dict)


def agree(trainer: Any, forward_error: BaseException | None, failures: dict[str, BaseException]) -> Account:
    """Every rank's failures, the same on every rank (a collective under DDP: call it on every rank).

    Args:
        trainer: the Lightning trainer (its ``world_size``).
        forward_error: what the forward pass raised on this rank, or ``None``.
        failures: the analyses that failed on this rank, with their errors.
    """
    local = {name: describe(err) for name, err in failures.items()}
    if forward_error is not None:
        local[FORWARD] = describe(forward_error)
    world = int(getattr(trainer, "world_size", 1) or 1)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[dict[str, str] | None] = [None] * world
        torch.distributed.all_gather_object(gathered, local)
    else:
        gathered = [local]
    by_name: dict[str, list[str]] = {}
    for rank, errors in enumerate(gathered):
        for name, text in (errors or {}).items():
            by_name.setdefault(name, []).append(f"rank {rank}: {text}" if world > 1 else text)
    joined = {name: "; ".join(texts) for name, texts in by_name.items()}
    return Account(joined.pop(FORWARD, ""), joined)

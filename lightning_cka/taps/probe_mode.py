"""Running a probe forward pass that leaves no trace on the model or on training."""

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


@contextmanager
def probe_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode without autograd for the duration of a probe; afterwards everything is as it was.

    - every submodule's ``training`` flag is restored individually (no blanket ``.train()``), so modules the user keeps
      in eval mode (frozen BatchNorm, a frozen backbone) stay there;
    - eval mode means BatchNorm uses and does not update its running statistics, and dropout draws nothing;
    - the global RNG states (torch CPU and every initialized CUDA device, NumPy, Python) are restored, so even a model
      that draws random numbers in eval mode cannot shift the training run's random stream;
    - compiled modules (``torch.compile(model)`` and ``model.compile()``) run eagerly: hooks registered after
      compilation are otherwise ignored (pytorch#117758). The training forward keeps its compiled graph.
    """
    flags = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        with preserved_rng(), torch.no_grad(), torch.compiler.set_stance("force_eager"):
            yield
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the torch (CPU and initialized CUDA devices), NumPy and Python RNG states on exit."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        yield
    finally:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state:
            torch.cuda.set_rng_state_all(state["cuda"])

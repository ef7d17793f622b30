"""Taps: forward hooks that reduce what a model computes to small per-minibatch values, and their probe context."""

from collections.abc import Hashable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_cka.taps.probe_mode import probe_mode


class Tap:
    """Hooks on one model that turn what they see in a forward pass into a small value (never an activation).

    Taps are built once per fit and attached only while a probe runs (see :class:`TapSet`). Taps with equal
    :attr:`key` are the same measurement, so analyses that need it share one tap.
    """

    key: Hashable

    def hooks(self, modules: Mapping[str, nn.Module]) -> list[RemovableHandle]:
        """Register the hooks on the model's ``modules`` (by name); the caller removes them."""
        raise NotImplementedError

    def begin(self, inputs: Tensor) -> None:
        """Forget the previous forward pass; ``inputs`` is the minibatch about to run."""

    def collect(self) -> Any:
        """The value of the forward pass that just ran."""
        raise NotImplementedError


class TapSet:
    """The taps of one model, attached for the duration of a ``with`` block.

    Inside the block the model runs as a probe (:func:`lightning_cka.taps.probe_mode.probe_mode`: eval mode, no
    autograd, RNG states and ``training`` flags restored afterwards); on exit every hook is removed, also when the
    forward raises.
    """

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module], taps: Sequence[Tap]) -> None:
        self.model = model
        self.modules = modules
        self.taps = list(taps)
        self._stack: ExitStack | None = None

    def __enter__(self) -> "TapSet":
        with ExitStack() as stack:
            stack.enter_context(probe_mode(self.model))
            handles = [self.model.register_forward_pre_hook(self._begin)]
            handles += [handle for tap in self.taps for handle in tap.hooks(self.modules)]
            for handle in handles:
                stack.callback(handle.remove)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def _begin(self, module: nn.Module, args: tuple) -> None:
        inputs = args[0] if args and isinstance(args[0], Tensor) else None
        for tap in self.taps:
            tap.begin(inputs)

    def collect(self) -> dict[Hashable, Any]:
        """Every tap's value for the forward pass that just ran, by key."""
        return {tap.key: tap.collect() for tap in self.taps}


def owners(modules: Mapping[str, nn.Module], name: str) -> list[nn.Module]:
    """The module called ``name`` and its ancestors, innermost first (the model itself last)."""
    parts = name.split(".") if name else []
    return [modules[".".join(parts[:i])] for i in range(len(parts), -1, -1)]


def first_tensor(output: object, name: str) -> Tensor:
    """The output itself, or the first tensor of a tuple / list output (PiT stages return ``(tokens, cls)``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list):
        for item in output:
            if isinstance(item, Tensor):
                return item
    raise TypeError(
        f"layer '{name}' returned {type(output).__name__}, not a tensor or a tuple holding one: monitor a module "
        "that returns a tensor."
    )

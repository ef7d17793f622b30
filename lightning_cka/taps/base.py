"""Taps: forward hooks that reduce what a model computes to small per-minibatch values, and their probe context."""

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_cka.taps.probe_mode import probe_mode


class TapValues(Mapping):
    """One model's tap values of a minibatch by tap key; a tap that failed raises its error when its value is read."""

    def __init__(self, values: Mapping[Hashable, Any], errors: Mapping[Hashable, BaseException]) -> None:
        self._values, self._errors = dict(values), dict(errors)

    def __getitem__(self, key: Hashable) -> Any:
        if key in self._errors:
            raise self._errors[key]
        return self._values[key]

    def __iter__(self) -> Iterator[Hashable]:
        return iter({**self._values, **self._errors})

    def __len__(self) -> int:
        return len({**self._values, **self._errors})


class Tap:
    """Hooks on one model that turn what they see in a forward pass into a small value (never an activation).

    Taps are built once per fit and attached only while a probe runs (see :class:`TapSet`). Taps with equal
    :attr:`key` are the same measurement, so analyses that need it share one tap. Hooks are registered through
    :meth:`on_output` and :meth:`on_input`, which keep a hook's first error instead of raising it: a tap that cannot
    measure this model fails alone, and the forward pass and the other taps go on.

    Attributes:
        error: the first error of a hook in the current forward pass, or ``None``.
    """

    key: Hashable
    error: BaseException | None = None

    def hooks(self, modules: Mapping[str, nn.Module]) -> list[RemovableHandle]:
        """Register the hooks on the model's ``modules`` (by name); the caller removes them."""
        raise NotImplementedError

    def begin(self, inputs: Tensor | None) -> None:
        """Forget the previous forward pass; ``inputs`` is the minibatch about to run."""

    def collect(self) -> Any:
        """The value of the forward pass that just ran."""
        raise NotImplementedError

    def on_output(self, module: nn.Module, hook: Callable[..., None]) -> RemovableHandle:
        """Register ``hook(module, args, output)`` as a forward hook whose errors the tap keeps."""
        return module.register_forward_hook(self._guarded(hook))

    def on_input(self, module: nn.Module, hook: Callable[..., None], with_kwargs: bool = False) -> RemovableHandle:
        """Register ``hook(module, args[, kwargs])`` as a forward pre-hook whose errors the tap keeps."""
        return module.register_forward_pre_hook(self._guarded(hook), with_kwargs=with_kwargs)

    def _guarded(self, hook: Callable[..., None]) -> Callable[..., None]:
        def guarded(*args: Any) -> None:
            if self.error is not None:
                return
            try:
                hook(*args)
            except Exception as err:
                self.error = err

        return guarded


class TapSet:
    """The taps of one model, attached for the duration of a ``with`` block.

    Inside the block the model runs as a probe (:func:`lightning_cka.taps.probe_mode.probe_mode`: eval mode, no
    autograd, RNG states and ``training`` flags restored afterwards); on exit every hook is removed, also when the
    forward raises. Call :meth:`begin` before each forward pass and :meth:`collect` after it.
    """

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module], taps: Sequence[Tap]) -> None:
        self.model = model
        self.modules = modules
        self.taps = list(taps)
        self._stack: ExitStack | None = None

    def __enter__(self) -> "TapSet":
        with ExitStack() as stack:
            stack.enter_context(probe_mode(self.model))
            for handle in (handle for tap in self.taps for handle in tap.hooks(self.modules)):
                stack.callback(handle.remove)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def begin(self, inputs: Tensor | None) -> None:
        """A forward pass on ``inputs`` is about to run: every tap forgets the last one and its error."""
        for tap in self.taps:
            tap.error = None
            try:
                tap.begin(inputs)
            except Exception as err:
                tap.error = err

    def collect(self) -> TapValues:
        """Every tap's value for the forward pass that just ran, by key; a failed tap's value raises its error."""
        values: dict[Hashable, Any] = {}
        errors: dict[Hashable, BaseException] = {}
        for tap in self.taps:
            if tap.error is not None:
                errors[tap.key] = tap.error
                continue
            try:
                values[tap.key] = tap.collect()
            except Exception as err:
                errors[tap.key] = err
        return TapValues(values, errors)


def owners(modules: Mapping[str, nn.Module], name: str) -> list[nn.Module]:
    """The module called ``name`` and its ancestors, innermost first (the model itself last)."""
    parts = name.split(".") if name else []
    return [modules[".".join(parts[:i])] for i in range(len(parts), -1, -1)]


def first_tensor(output: object, name: str) -> Tensor:
    """The output itself, or the first tensor of a tuple / list / mapping output.

    PiT stages return ``(tokens, cls)``, Hugging Face Swin blocks ``(hidden_states, attention weights or None)``, and
    Hugging Face encoders a ``ModelOutput`` (a mapping) whose first value is the hidden state.
    """
    if isinstance(output, Tensor):
        return output
    items = output.values() if isinstance(output, Mapping) else output if isinstance(output, tuple | list) else ()
    for item in items:
        if isinstance(item, Tensor):
            return item
    raise TypeError(
        f"layer '{name}' returned {type(output).__name__}, not a tensor or a tuple holding one: monitor a module "
        "that returns a tensor."
    )

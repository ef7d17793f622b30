"""Named tensors summed (or maximized) over minibatches and, under DDP, over ranks: the state of most analyses."""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class TensorSums(Metric):
    """Sums of named tensors of fixed shapes (``dist_reduce_fx="sum"``).

    Args:
        shapes: the shape of each sum by name.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> sums = TensorSums({"total": (2,), "count": ()})
        >>> sums.update("total", torch.tensor([1.0, 2.0]))
        >>> sums.update("total", torch.tensor(5.0), index=1)
        >>> sums.update("count", torch.tensor(2.0))
        >>> {name: value.tolist() for name, value in sums.compute().items()}
        {'total': [1.0, 7.0], 'count': 2.0}
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.names = list(shapes)
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        for name, shape in shapes.items():
            self.add_state(name, default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, name: str, value: Tensor, index: Any = None) -> None:
        """Add ``value`` to the sum ``name`` (to its entries ``index``, when given)."""
        state = getattr(self, name)
        if index is None:
            state += value.to(state.dtype)
        else:
            state[index] += value.to(state.dtype)

    def compute(self) -> dict[str, Tensor]:
        """Every sum by name (torchmetrics squeezes one-element sums: :meth:`totals` keeps the shapes)."""
        return {name: getattr(self, name) for name in self.names}

    def totals(self) -> dict[str, Tensor]:
        """:meth:`compute` (a collective under DDP) with every sum in its declared shape."""
        return {name: value.reshape(self.shapes[name]) for name, value in self.compute().items()}


class TensorMaxima(Metric):
    """Elementwise maxima of a vector over updates and ranks (``dist_reduce_fx="max"``).

    What every rank must agree on before a sum: the shapes a rank without minibatches cannot know (feature dims,
    classes, a grid).

    Args:
        size: the vector's length.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> maxima = TensorMaxima(2)
        >>> maxima.update(torch.tensor([3.0, 1.0]))
        >>> maxima.update(torch.tensor([2.0, 5.0]))
        >>> maxima.compute().tolist()
        [3.0, 5.0]
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("value", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="max")

    def update(self, value: Tensor) -> None:
        """Raise the maxima to ``value`` where it is larger."""
        self.value = torch.maximum(self.value, value.to(self.value))

    def compute(self) -> Tensor:
        """The maxima, shaped ``(size,)``."""
        return self.value.reshape(-1)

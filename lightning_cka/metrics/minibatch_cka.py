"""Minibatch CKA of every layer pair as a torchmetrics ``Metric`` (Nguyen, Raghu & Kornblith 2021)."""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_cka.functional.cka import _cka_compute, _cka_update


class MinibatchCKA(Metric):
    """Minibatch CKA: summed unbiased HSIC over minibatches, normalized once at the end.

    ``CKA(a, b) = Σᵢ HSIC₁(Kᵢ, Lᵢ) / sqrt(Σᵢ HSIC₁(Kᵢ, Kᵢ)·Σᵢ HSIC₁(Lᵢ, Lᵢ))`` over minibatches ``i`` for every pair
    of layers ``a`` of model A and ``b`` of model B (or of A with itself). Each ``update`` takes one minibatch and adds
    the HSIC of every pair from one matrix product of U-centered Grams. The states are sums
    (``dist_reduce_fx="sum"``), so under DDP ``compute()`` gives the estimate over all ranks' minibatches.

    Args:
        num_layers_a: number of layers of model A. Optional: without it the state shape is set by the first
            ``update`` after each reset. Give it under DDP when a rank may get no minibatch.
        num_layers_b: number of layers of model B (cross mode). ``None`` with ``num_layers_a`` set means A against
            itself.
        layer_names_a: names of A's layers, used for plot labels and warnings (sets ``num_layers_a``).
        layer_names_b: names of B's layers (sets ``num_layers_b``).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from lightning_cka import MinibatchCKA
        >>> g = torch.Generator().manual_seed(0)
        >>> metric = MinibatchCKA()
        >>> for _ in range(3):
        ...     x = torch.randn(32, 16, generator=g)
        ...     metric.update([x, x.relu(), torch.randn(32, 4, 4, generator=g)])
        >>> metric.compute().round(decimals=2)
        tensor([[1.0000, 0.7200, 0.0100],
                [0.7200, 1.0000, 0.0300],
                [0.0100, 0.0300, 1.0000]], dtype=torch.float64)

    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    hsic: Tensor
    num_batches: Tensor

    def __init__(
        self,
        num_layers_a: int | None = None,
        num_layers_b: int | None = None,
        layer_names_a: Sequence[str] | None = None,
        layer_names_b: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.layer_names_a = _names(layer_names_a, num_layers_a, "a")
        self.layer_names_b = _names(layer_names_b, num_layers_b, "b")
        self.num_layers_a = len(self.layer_names_a) if self.layer_names_a is not None else num_layers_a
        self.num_layers_b = len(self.layer_names_b) if self.layer_names_b is not None else num_layers_b
        if self.num_layers_b is not None and self.num_layers_a is None:
            raise ValueError("num_layers_b was given without num_layers_a; give both (or neither).")
        for name, value in (("num_layers_a", self.num_layers_a), ("num_layers_b", self.num_layers_b)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of layers, got {value}.")
        self._declared = self.num_layers_a is not None
        # A 0-dim zero broadcasts against the first minibatch's (L, L) sum when the shape is not declared.
        total = (self.num_layers_a or 0) + (self.num_layers_b or 0)
        default = torch.zeros((total, total) if self._declared else (), dtype=torch.float64)
        self.add_state("hsic", default=default, dist_reduce_fx="sum")
        self.add_state("num_batches", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self._seen_layers: tuple[int, int | None] | None = None

    def update(
        self,
        xs: Sequence[Tensor] | Tensor,
        ys: Sequence[Tensor] | Tensor | None = None,
        grams: bool = False,
    ) -> None:
        """Add one minibatch.

        Args:
            xs: per-layer features ``(n, ...)`` of model A (or, with ``grams=True``, their ``(n, n)`` Gram matrices as a
                list or an ``(L, n, n)`` tensor).
            ys: the same for model B on the same ``n`` examples, or ``None`` for A against itself.
            grams: inputs are Gram matrices (e.g. from :class:`lightning_cka.Recorder`) instead of features.

        """
        hsic, num_layers_a = _cka_update(xs, ys, unbiased=True, grams=grams)
        layers = (num_layers_a, None if ys is None else hsic.shape[0] - num_layers_a)
        self._check_layers(layers)
        self.hsic = self.hsic + hsic
        self.num_batches += 1

    def _check_layers(self, layers: tuple[int, int | None]) -> None:
        expected = (self.num_layers_a, self.num_layers_b) if self._declared else self._seen_layers
        if expected is not None and layers != expected:
            raise ValueError(
                f"MinibatchCKA got (layers of A, layers of B) = {layers}, but {expected} "
                f"{'were declared' if self._declared else 'in earlier updates'}. Every minibatch must bring the same "
                "layers (B is None for A against itself); call reset() to start over with other layers."
            )
        self._seen_layers = layers

    def compute(self) -> Tensor:
        """``(La, Lb)`` CKA matrix, or ``(La, La)`` symmetric with a unit diagonal for A against itself."""
        if self.num_batches == 0:
            raise ValueError("MinibatchCKA.compute() was called before any update(); add at least one minibatch.")
        num_layers_a, num_layers_b = self._seen_layers or (self.num_layers_a, self.num_layers_b)
        names = None
        if self.layer_names_a is not None:
            names = list(self.layer_names_a) + list(self.layer_names_b or [])
        return _cka_compute(self.hsic, num_layers_a, cross=num_layers_b is not None, layer_names=names)

    def reset(self) -> None:
        """Clear the sums (and, without declared sizes, the layer counts)."""
        super().reset()
        self._seen_layers = None

    def plot(self, val: Tensor | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Heatmap of the CKA matrix with the layer names on the axes.

        Args:
            val: a matrix from :meth:`compute`; computed when ``None``.
            ax: a matplotlib ``Axes`` to draw into; a new figure is made when ``None``.

        Returns:
            ``(fig, ax)``.

        """
        from lightning_cka.plotting import cka_heatmap

        val = self.compute() if val is None else val
        cross = self.num_layers_b is not None or (self._seen_layers is not None and self._seen_layers[1] is not None)
        return cka_heatmap(val, self.layer_names_a, self.layer_names_b if cross else self.layer_names_a, ax=ax)


def _names(names: Sequence[str] | None, count: int | None, side: str) -> list[str] | None:
    if names is None:
        return None
    names = [str(n) for n in names]
    if count is not None and count != len(names):
        raise ValueError(f"num_layers_{side}={count} but layer_names_{side} has {len(names)} names.")
    return names

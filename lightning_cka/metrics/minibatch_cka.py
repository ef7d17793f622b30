"""Minibatch CKA of every layer pair as a torchmetrics ``Metric`` (Nguyen, Raghu & Kornblith 2021)."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_cka.functional.cka import _as_layer_list
from lightning_cka.functional.estimate import (
    WEIGHTINGS,
    CKAEstimate,
    Weighting,
    cka_estimate,
    minibatch_weights,
    warn_degenerate,
)
from lightning_cka.functional.hsic import _check_num_examples, _hsic_terms, draw_permutations, gram


class MinibatchCKA(Metric):
    """Minibatch CKA: summed unbiased HSIC over minibatches, normalized once at the end, with error bars.

    ``CKA(a, b) = Σᵢ HSIC₁(Kᵢ, Lᵢ) / sqrt(Σᵢ HSIC₁(Kᵢ, Kᵢ)·Σᵢ HSIC₁(Lᵢ, Lᵢ))`` over minibatches ``i`` for every pair
    of layers ``a`` of model A and ``b`` of model B (or of A with itself). Each ``update`` takes one minibatch and adds
    the HSIC of every pair from one matrix product of U-centered Grams. The HSIC terms are kept per minibatch, so
    :attr:`estimate` also gives the block-jackknife standard error of every cell (leave one minibatch out) and, with
    ``permutations``, a permutation-null threshold (the examples of B shuffled within the minibatch: cyclic shifts of
    a random order when the minibatch has more examples than permutations, whose products all come from one FFT at
    about twice the cost of the unpermuted product, else uniformly random permutations, one product each). States
    are sums (``dist_reduce_fx="sum"``), each minibatch in its own row, so under DDP ``compute()`` gives the estimate
    over all ranks' minibatches, exactly as one process would.

    Args:
        num_layers_a: number of layers of model A. Optional: without it the state shape is set by the first
            ``update`` after each reset. Give it under DDP when a rank may get no minibatch.
        num_layers_b: number of layers of model B (cross mode). ``None`` with ``num_layers_a`` set means A against
            itself.
        layer_names_a: names of A's layers, used for plot labels and warnings (sets ``num_layers_a``).
        layer_names_b: names of B's layers (sets ``num_layers_b``).
        num_minibatches: the number of minibatches of a pass (all ranks together). Required under DDP, where every
            ``update`` must then give its minibatch's global ``index``; without it, minibatches are numbered in update
            order and the states grow as they come.
        permutations: permutations of the null per minibatch; 19 give the 5% permutation test, 0 none.
        seed: seed of the permutations (each minibatch's are drawn from ``(seed, index)``, the same on every rank).
        minibatch_weights: ``"equal"`` (every minibatch's HSIC counts the same) or ``"size"`` (weighted by
            ``n(n - 3)``, as google-research's ``efficient_CKA.py`` sums them); they differ only for minibatches of
            unequal size.
        warn: warn about layers whose CKA is NaN (callers that explain them better turn it off).
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
        >>> metric.estimate.se.round(decimals=2)[0]  # standard errors, from leaving one of the 3 minibatches out
        tensor([0.0000, 0.0200, 0.0500], dtype=torch.float64)

    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    cross: Tensor
    self_a: Tensor
    self_b: Tensor
    null: Tensor
    sizes: Tensor

    def __init__(
        self,
        num_layers_a: int | None = None,
        num_layers_b: int | None = None,
        layer_names_a: Sequence[str] | None = None,
        layer_names_b: Sequence[str] | None = None,
        num_minibatches: int | None = None,
        permutations: int = 0,
        seed: int = 0,
        minibatch_weights: Weighting = "equal",
        warn: bool = True,
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
        if num_minibatches is not None and num_minibatches < 1:
            raise ValueError(f"num_minibatches must be a positive int, got {num_minibatches}.")
        if permutations < 0:
            raise ValueError(f"permutations must be >= 0, got {permutations}.")
        if minibatch_weights not in WEIGHTINGS:
            raise ValueError(f"minibatch_weights must be one of {WEIGHTINGS}, got {minibatch_weights!r}.")
        self.num_minibatches = num_minibatches
        self.permutations = permutations
        self.seed = seed
        self.minibatch_weights = minibatch_weights
        self.warn = warn
        la, lb = self.num_layers_a, self.num_layers_b
        declared = la is not None and num_minibatches is not None
        m, lb_or_a = (num_minibatches, lb if lb is not None else la) if declared else (0, 0)
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64)  # noqa: E731
        self.add_state("cross", default=zeros(m, la or 0, lb_or_a), dist_reduce_fx="sum")
        self.add_state("self_a", default=zeros(m, la or 0), dist_reduce_fx="sum")
        self.add_state("self_b", default=zeros(m, lb_or_a), dist_reduce_fx="sum")
        self.add_state("null", default=zeros(permutations, la or 0, lb_or_a), dist_reduce_fx="sum")
        self.add_state("sizes", default=torch.zeros(m, dtype=torch.long), dist_reduce_fx="sum")
        self._seen_layers: tuple[int, int | None] | None = (la, lb) if la is not None else None
        self._next_index = 0
        self._estimate: CKAEstimate | None = None

    def update(
        self,
        xs: Sequence[Tensor] | Tensor,
        ys: Sequence[Tensor] | Tensor | None = None,
        grams: bool = False,
        index: int | None = None,
    ) -> None:
        """Add one minibatch.

        Args:
            xs: per-layer features ``(n, ...)`` of model A (or, with ``grams=True``, their ``(n, n)`` Gram matrices as a
                list or an ``(L, n, n)`` tensor).
            ys: the same for model B on the same ``n`` examples, or ``None`` for A against itself.
            grams: inputs are Gram matrices (e.g. from a forward hook) instead of features.
            index: the minibatch's number in ``[0, num_minibatches)`` (required under DDP); default: the next one.

        """
        layers_a = _as_layer_list(xs, "xs")
        layers_b = None if ys is None else _as_layer_list(ys, "ys")
        n = layers_a[0].shape[0]
        for side, layers in (("xs", layers_a), ("ys", layers_b or [])):
            for i, t in enumerate(layers):
                if t.shape[0] != n:
                    raise ValueError(
                        f"every layer must hold the same examples: {side}[{i}] has {t.shape[0]}, xs[0] has {n}. "
                        "Models A and B must see the same minibatch."
                    )
                if grams and t.shape != (n, n):
                    raise ValueError(f"{side}[{i}] must be an (n, n) Gram matrix, got shape {tuple(t.shape)}.")
        _check_num_examples(n, 4)
        self._check_layers((len(layers_a), None if layers_b is None else len(layers_b)))
        index = self._claim(index)
        if not grams:
            layers_a = [gram(t, center=True) for t in layers_a]
            layers_b = None if layers_b is None else [gram(t, center=True) for t in layers_b]
        terms = _hsic_terms(layers_a, layers_b, self._permutations(index, n, layers_a[0].device))
        self._grow(index + 1, len(layers_a), terms.cross.shape[1])
        weight = float(minibatch_weights(torch.tensor([n]), self.minibatch_weights))
        self.cross[index] += terms.cross
        self.self_a[index] += terms.self_a
        self.self_b[index] += terms.self_b
        self.null += weight * terms.null
        self.sizes[index] += n
        self._estimate = None

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Add one minibatch (as :meth:`update`) and return the CKA of that minibatch alone."""
        alone = MinibatchCKA(
            layer_names_a=self.layer_names_a,
            layer_names_b=self.layer_names_b,
            minibatch_weights=self.minibatch_weights,
            warn=self.warn,
        ).to(self.device)
        alone.update(*args, **{k: v for k, v in kwargs.items() if k != "index"})
        self.update(*args, **kwargs)
        return alone.compute()

    def _claim(self, index: int | None) -> int:
        if index is None:
            index = self._next_index
        if index < 0 or (self.num_minibatches is not None and index >= self.num_minibatches):
            raise IndexError(f"minibatch index {index} is outside [0, {self.num_minibatches}).")
        if index < self.sizes.shape[0] and self.sizes[index] > 0:
            raise ValueError(f"minibatch {index} was already added; each index takes one minibatch per pass.")
        self._next_index = max(self._next_index, index + 1)
        return index

    def _permutations(self, index: int, n: int, device: torch.device) -> Sequence[Tensor]:
        # Shifts of a random order when n allows (their products share one FFT), else uniform permutations.
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0]))
        return draw_permutations(n, self.permutations, generator, device)

    def _grow(self, rows: int, num_a: int, num_b: int) -> None:
        """Give the states room for ``rows`` minibatches of ``num_a`` x ``num_b`` layers (undeclared sizes grow)."""
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=self.device)  # noqa: E731
        if self.cross.shape[1:] != (num_a, num_b):  # undeclared: the first minibatch after a reset sets the shapes
            self.cross, self.self_a, self.self_b = zeros(rows, num_a, num_b), zeros(rows, num_a), zeros(rows, num_b)
            self.null = zeros(self.permutations, num_a, num_b)
            self.sizes = torch.zeros(rows, dtype=torch.long, device=self.device)
        elif self.cross.shape[0] < rows:
            extra = rows - self.cross.shape[0]
            self.cross = torch.cat([self.cross, zeros(extra, num_a, num_b)])
            self.self_a = torch.cat([self.self_a, zeros(extra, num_a)])
            self.self_b = torch.cat([self.self_b, zeros(extra, num_b)])
            self.sizes = torch.cat([self.sizes, self.sizes.new_zeros(extra)])

    def _check_layers(self, layers: tuple[int, int | None]) -> None:
        expected = self._seen_layers
        if expected is not None and layers != expected:
            declared = self.num_layers_a is not None
            raise ValueError(
                f"MinibatchCKA got (layers of A, layers of B) = {layers}, but {expected} "
                f"{'were declared' if declared else 'in earlier updates'}. Every minibatch must bring the same "
                "layers (B is None for A against itself); call reset() to start over with other layers."
            )
        self._seen_layers = layers

    def compute(self) -> Tensor:
        """``(La, Lb)`` CKA matrix, or ``(La, La)`` symmetric with a unit diagonal for A against itself."""
        if int((self.sizes > 0).sum()) == 0:
            raise ValueError("MinibatchCKA.compute() was called before any update(); add at least one minibatch.")
        joint = self._seen_layers is None or self._seen_layers[1] is None
        estimate = cka_estimate(
            self.cross,
            self.self_a,
            self.self_b,
            minibatch_weights(self.sizes, self.minibatch_weights),
            self.null if self.permutations else None,
            joint=joint,
        )
        names_a = self.layer_names_a or [f"#{i}" for i in range(estimate.value.shape[0])]
        if self.warn:
            warn_degenerate(names_a, estimate.degenerate_a)
        if self.warn and not joint:
            names_b = self.layer_names_b or [f"#{i}" for i in range(estimate.value.shape[1])]
            warn_degenerate(names_b, estimate.degenerate_b)
        self._estimate = estimate
        return estimate.value

    @property
    def estimate(self) -> CKAEstimate:
        """The last :meth:`compute`'s matrix with its standard errors and null thresholds (computes when needed)."""
        if self._estimate is None:
            self.compute()
        return self._estimate

    def reset(self) -> None:
        """Clear the sums (and, without declared sizes, the layer counts)."""
        super().reset()
        la, lb = self.num_layers_a, self.num_layers_b
        self._seen_layers = (la, lb) if la is not None else None
        self._next_index = 0
        self._estimate = None

    def plot(self, val: Tensor | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Heatmap of the CKA matrix with the layer names on the axes.

        Args:
            val: a matrix from :meth:`compute`; computed when ``None``.
            ax: a matplotlib ``Axes`` to draw into; a new figure is made when ``None``.

        Returns:
            ``(fig, ax)``.

        """
        from lightning_cka.figures.render import draw_panel
        from lightning_cka.figures.spec import Heatmap

        val = (self.compute() if val is None else val).detach().cpu().numpy()
        joint = self._seen_layers is None or self._seen_layers[1] is None
        rows = self.layer_names_a or [str(i) for i in range(val.shape[0])]
        cols = (self.layer_names_a if joint else self.layer_names_b) or [str(i) for i in range(val.shape[1])]
        fig, ax, _ = draw_panel(Heatmap(val, tuple(rows), tuple(cols)), ax=ax)
        return fig, ax


def _names(names: Sequence[str] | None, count: int | None, side: str) -> list[str] | None:
    if names is None:
        return None
    names = [str(n) for n in names]
    if count is not None and count != len(names):
        raise ValueError(f"num_layers_{side}={count} but layer_names_{side} has {len(names)} names.")
    return names

"""Linear CKA: full-data (Kornblith et al. 2019) and per-minibatch for every layer pair (Nguyen et al. 2021)."""

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_cka.functional.estimate import cka_estimate, warn_degenerate
from lightning_cka.functional.hsic import _check_num_examples, _hsic_terms, _pairwise_hsic, gram


def linear_cka(x: Tensor, y: Tensor, unbiased: bool = False) -> Tensor:
    """Linear CKA of two representations of the same ``n`` examples (Kornblith et al. 2019).

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K)·HSIC(L, L))`` with linear Grams ``K = XXᵀ``, ``L = YYᵀ``. When both
    representations have fewer features than examples, the HSICs are computed in feature space (``‖XᵀY‖²`` and
    friends) and no ``(n, n)`` matrix is built. Computed in float64.

    Args:
        x: ``(n, ...)`` first representation; trailing dims are flattened.
        y: ``(n, ...)`` second representation.
        unbiased: use the unbiased HSIC estimator (Song et al. 2012), i.e. debiased CKA; needs ``n >= 4``.

    Returns:
        0-dim float64 tensor; NaN when either representation is constant.

    Example:
        >>> import torch
        >>> from lightning_cka.functional import linear_cka
        >>> x = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
        >>> q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
        >>> round(linear_cka(x, 3 * x @ q).item(), 6)  # invariant to rotation and isotropic scaling
        1.0

    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same examples, got n={x.shape[0]} and n={y.shape[0]}.")
    n = x.shape[0]
    _check_num_examples(n, 4 if unbiased else 2)
    x = x.reshape(n, -1).to(torch.float64)
    y = y.reshape(n, -1).to(torch.float64)
    if x.shape[1] < n and y.shape[1] < n:
        xy, xx, yy = (_feature_space_hsic(a, b, unbiased) for a, b in ((x, y), (x, x), (y, y)))
        return xy / torch.sqrt(xx * yy)
    hsic = _pairwise_hsic([gram(x, center=True), gram(y, center=True)], unbiased=unbiased)
    return hsic[0, 1] / torch.sqrt(hsic[0, 0] * hsic[1, 1])


def _feature_space_hsic(x: Tensor, y: Tensor, unbiased: bool) -> Tensor:
    """HSIC of linear kernels from ``(n, F)`` features, never forming an ``(n, n)`` matrix."""
    n = x.shape[0]
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    cross = (x.T @ y).square().sum()  # tr(KL) = ‖XᵀY‖²
    if not unbiased:
        return cross / (n - 1) ** 2
    # Unbiased estimator in terms of K̃ = K - diag(K): with centered columns X·1ᵀX = 0, so K̃1 = -diag(K).
    k_diag = x.square().sum(dim=1)  # (n,)
    l_diag = y.square().sum(dim=1)
    trace_term = cross - (k_diag * l_diag).sum()  # tr(K̃L̃)
    sum_term = k_diag.sum() * l_diag.sum() / ((n - 1) * (n - 2))  # (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2))
    row_term = 2.0 / (n - 2) * (k_diag * l_diag).sum()  # 2/(n-2) · 1ᵀK̃L̃1
    return (trace_term + sum_term - row_term) / (n * (n - 3))


def cka_matrix(xs: Sequence[Tensor], ys: Sequence[Tensor] | None = None, unbiased: bool = True) -> Tensor:
    """CKA of every layer pair on one minibatch.

    All pairs come from one matrix product of the stacked, flattened centered Grams (U-centered for the unbiased
    estimator), not from a loop over pairs.

    Args:
        xs: per-layer features of model A, each ``(n, ...)`` (any trailing dims; conv maps and token tensors are
            flattened).
        ys: per-layer features of model B on the same ``n`` examples, or ``None`` to compare A with itself.
        unbiased: unbiased HSIC (Song et al. 2012; needs ``n >= 4``) or the biased estimator.

    Returns:
        ``(len(xs), len(ys))`` float64 matrix; for ``ys=None`` a symmetric ``(len(xs), len(xs))`` matrix with a unit
        diagonal. Rows and columns of layers that are constant or hold NaN/inf are NaN (with a warning).

    Example:
        >>> import torch
        >>> from lightning_cka.functional import cka_matrix
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(64, 10, generator=g)
        >>> cka_matrix([x, 2 * x, torch.randn(64, 3, 4, generator=g)], unbiased=False).round(decimals=2)
        tensor([[1.0000, 1.0000, 0.1800],
                [1.0000, 1.0000, 0.1800],
                [0.1800, 0.1800, 1.0000]], dtype=torch.float64)

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
    _check_num_examples(n, 4 if unbiased else 2)
    terms = _hsic_terms(
        [gram(t, center=True) for t in layers_a],
        None if layers_b is None else [gram(t, center=True) for t in layers_b],
        unbiased=unbiased,
    )
    one = torch.ones(1, dtype=torch.float64, device=terms.cross.device)
    estimate = cka_estimate(terms.cross[None], terms.self_a[None], terms.self_b[None], one, joint=layers_b is None)
    names = [f"xs[{i}]" for i in range(len(layers_a))]
    warn_degenerate(names, estimate.degenerate_a)
    if layers_b is not None:
        warn_degenerate([f"ys[{i}]" for i in range(len(layers_b))], estimate.degenerate_b)
    return estimate.value


def _as_layer_list(layers: Sequence[Tensor] | Tensor, name: str) -> list[Tensor]:
    if isinstance(layers, Tensor):
        if layers.dim() < 2:
            raise ValueError(f"{name} must be a sequence of per-layer tensors, got one tensor of shape {layers.shape}.")
        layers = list(layers.unbind(0))
    else:
        layers = list(layers)
    if not layers:
        raise ValueError(f"{name} must hold at least one layer, got none.")
    for i, t in enumerate(layers):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}.")
    return layers

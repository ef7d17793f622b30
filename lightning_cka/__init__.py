"""Watch how a vision model's representations form while it trains: minibatch CKA and the paper's other analyses.

The names below are imported on first use, so that ``lightning-cka --help`` and ``import lightning_cka`` do not pay for
torch, timm and Lightning up front, and reading results (``CKAResult``, ``Analysis``) never does. Using any of the
others also registers ``resnet18_cifar`` with timm.
"""

from importlib import import_module
from typing import Any

from lightning_cka.__about__ import __version__

_EXPORTS = {
    "Analysis": "lightning_cka.engine.analysis",
    "CKAMonitor": "lightning_cka.callbacks",
    "CKAResult": "lightning_cka.result",
    "Field": "lightning_cka.engine.analysis",
    "MeanAttentionDistance": "lightning_cka.metrics",
    "MinibatchCKA": "lightning_cka.metrics",
    "Reference": "lightning_cka.reference",
    "View": "lightning_cka.engine.analysis",
    "compare_models": "lightning_cka.compare",
    "find_layers": "lightning_cka.taps",
    "probe_mode": "lightning_cka.taps",
}
_TORCH_FREE = {"Analysis", "CKAResult", "Field", "View"}  # reading results needs none of torch, timm or Lightning

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_cka' has no attribute {name!r}")
    if name not in _TORCH_FREE:
        import_module("lightning_cka.models")  # registers resnet18_cifar with timm
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

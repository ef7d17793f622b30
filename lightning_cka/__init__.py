"""Watch how a vision model's representations form while it trains: minibatch CKA and attention distances."""

from typing import Any

from lightning_cka import models as _models  # noqa: F401  (registers resnet18_cifar with timm)
from lightning_cka.__about__ import __version__
from lightning_cka.compare import compare_models
from lightning_cka.metrics import MeanAttentionDistance, MinibatchCKA
from lightning_cka.result import CKAResult
from lightning_cka.taps import Recorder, find_layers, probe_mode

__all__ = [
    "CKAMonitor",
    "CKAResult",
    "MeanAttentionDistance",
    "MinibatchCKA",
    "Recorder",
    "__version__",
    "compare_models",
    "find_layers",
    "probe_mode",
]


def __getattr__(name: str) -> Any:
    # CKAMonitor imports Lightning, which takes seconds: the command line and the one-shot API do without it.
    if name == "CKAMonitor":
        from lightning_cka.callbacks import CKAMonitor

        return CKAMonitor
    raise AttributeError(f"module 'lightning_cka' has no attribute {name!r}")

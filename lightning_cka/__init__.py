"""Watch how a vision model's representations form while it trains: minibatch CKA and attention distances."""

from lightning_cka.__about__ import __version__
from lightning_cka.callbacks import CKAMonitor
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

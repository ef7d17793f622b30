"""torchmetrics ``Metric`` classes that accumulate over minibatches and reduce across DDP ranks."""

from lightning_cka.metrics.attention_distance import MeanAttentionDistance
from lightning_cka.metrics.minibatch_cka import MinibatchCKA

__all__ = ["MeanAttentionDistance", "MinibatchCKA"]

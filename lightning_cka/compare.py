"""One-shot analysis of trained models: intra-model CKA, cross-model CKA and attention distances."""

from contextlib import ExitStack
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lightning_cka.data import iterate_inputs
from lightning_cka.metrics.minibatch_cka import MinibatchCKA
from lightning_cka.result import CKAResult
from lightning_cka.taps.layers import LayerSpec
from lightning_cka.taps.recorder import Recorder, Reduction
from lightning_cka.taps.unwrap import model_device


def compare_models(
    model_a: nn.Module,
    model_b: nn.Module | None = None,
    *,
    data: Any,
    layers_a: LayerSpec = "auto",
    layers_b: LayerSpec = "auto",
    batch_size: int = 256,
    reduction: Reduction = "flatten",
    reduction_b: Reduction | None = None,
    attention: bool | Literal["auto"] = "auto",
    input_key: str | None = None,
) -> CKAResult:
    """Minibatch CKA of model A's layers with each other and with model B's, plus attention distances.

    Every minibatch runs once through each model; hooks reduce each layer's output to its Gram on the spot (see
    :class:`Recorder`), and one matrix product per minibatch yields the HSIC of every layer pair of A and B together.
    The HSIC sums run over **all** minibatches (Nguyen et al. 2021) and are normalized once at the end. Token outputs
    ``(n, T, D)`` are compared across images (flattened per image), not as per-image token Grams. The models run in
    eval mode without autograd and are left exactly as they were; wrap the call in ``torch.autocast`` to probe in
    mixed precision.

    Args:
        model_a: the model whose layers are the rows of every matrix.
        model_b: a second model (e.g. a ResNet next to a ViT), stored as the *reference* in the result.
        data: images: an ``(N, C, H, W)`` tensor, a ``Dataset`` or a ``DataLoader`` (tuple batches give their first
            element, dict batches ``input_key``). Each minibatch is moved to each model's device.
        layers_a: layers of A: ``"auto"`` or names / glob patterns (:func:`find_layers`).
        layers_b: layers of B.
        batch_size: minibatch size for tensors and datasets (a DataLoader keeps its own); at least 4.
        reduction: ``"flatten"``, ``"cls"`` or ``"mean"`` for A's outputs (see :class:`Recorder`).
        reduction_b: the same for B (default: ``reduction``).
        attention: record mean attention distances of timm attention modules (``"auto"``: where there are some).
        input_key: key of the images in dict batches.

    Returns:
        A :class:`CKAResult` with ``intra`` (A), ``reference_intra`` (B), ``reference`` (A x B) and the distances.

    Example:
        >>> import timm, torch
        >>> from lightning_cka import compare_models
        >>> vit, resnet = timm.create_model("test_vit"), timm.create_model("test_resnet")
        >>> result = compare_models(vit, resnet, data=torch.randn(16, 3, 160, 160), batch_size=8)
        >>> result.intra.shape, result.reference.shape, result.mean_attention_distance.shape
        ((6, 6), (6, 4), (6, 2))
    """
    if batch_size < 4:
        raise ValueError(f"batch_size must be at least 4 for the unbiased CKA estimator, got {batch_size}.")
    recorders = [Recorder(model_a, layers_a, reduction, attention)]
    if model_b is not None:
        recorders.append(Recorder(model_b, layers_b, reduction_b or reduction, attention))
    device = model_device(recorders[0].model)
    names = [f"{name} ({side})" for rec, side in zip(recorders, "AB", strict=False) for name in rec.layers]
    metric = MinibatchCKA(layer_names_a=names).to(device)
    num_examples = 0
    with ExitStack() as stack:
        for rec in recorders:
            stack.enter_context(rec)
        for inputs in iterate_inputs(data, batch_size, input_key):
            on_device: dict[torch.device, torch.Tensor] = {}
            grams = []
            for rec in recorders:
                rec_device = model_device(rec.model)
                if rec_device not in on_device:
                    on_device[rec_device] = inputs.to(rec_device, non_blocking=True)
                rec.model(on_device[rec_device])
                grams += [g.to(device) for g in rec.grams]
            metric.update(grams, grams=True)
            num_examples += inputs.shape[0]
    if num_examples == 0:
        raise ValueError("data yielded no minibatch of at least 4 examples.")
    full = metric.compute().cpu().numpy()
    num_a = len(recorders[0].layers)
    result = CKAResult(layers=recorders[0].layers, intra=full[:num_a, :num_a], num_examples=num_examples)
    result.attention_layers, result.mean_attention_distance, result.uniform_attention_distance = _distances(
        recorders[0]
    )
    if model_b is not None:
        result.reference_layers = recorders[1].layers
        result.reference = full[:num_a, num_a:]
        result.reference_intra = full[num_a:, num_a:]
        (
            result.reference_attention_layers,
            result.reference_mean_attention_distance,
            result.reference_uniform_attention_distance,
        ) = _distances(recorders[1])
    return result


def _distances(rec: Recorder) -> tuple[list[str], np.ndarray, float]:
    if rec.attention is None:
        return [], np.zeros((0, 0)), float("nan")
    return rec.attention_layers, rec.attention.compute().cpu().numpy(), rec.attention.uniform_distance

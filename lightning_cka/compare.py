"""One-shot analysis of trained models: every analysis of a probe, on one model or a model and a reference."""

import json
import warnings
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_cka.analyses import resolve_analyses
from lightning_cka.engine import options
from lightning_cka.engine.analysis import Analysis, describe_error
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
from lightning_cka.probe_data.batches import MIN_BATCH, iterate_batches
from lightning_cka.probe_data.sample import ProbeHasher
from lightning_cka.result import CKAResult
from lightning_cka.taps.grams import Reduction
from lightning_cka.taps.layers import LayerSpec


def compare_models(
    model_a: nn.Module,
    model_b: nn.Module | None = None,
    *,
    data: Any,
    analyses: Sequence[Analysis | str] | None = None,
    layers_a: LayerSpec = "auto",
    layers_b: LayerSpec = "auto",
    batch_size: int | None = None,
    reduction: Reduction = "flatten",
    reduction_b: Reduction | None = None,
    input_key: str | None = None,
    label_key: str | None = None,
    label_b: str = "",
    seed: int = 0,
) -> CKAResult:
    """Every analysis of a probe on model A, and A against model B: CKA with error bars, attention, the rest.

    Every minibatch runs once through each model; hooks reduce what the analyses need (each layer's Gram, attention
    probabilities, ...) on the spot, and one matrix product per minibatch yields the HSIC of every layer pair of A and
    B together. The HSIC sums run over **all** minibatches (Nguyen et al. 2021) and are normalized once at the end;
    the sums are kept per minibatch for the jackknife standard errors. Token outputs ``(n, T, D)`` are compared across
    images (flattened per image), not as per-image token Grams. The models run in eval mode without autograd and are
    left exactly as they were; wrap the call in ``torch.autocast`` to probe in mixed precision.

    Args:
        model_a: the model whose layers are the rows of every matrix.
        model_b: a second model (e.g. a ResNet next to a ViT), stored as the *reference* in the result.
        data: images: an ``(N, C, H, W)`` tensor, a ``Dataset`` or a ``DataLoader`` (tuple batches give their first
            element, dict batches ``input_key``; labels come from ``(image, label)`` batches or ``label_key``). Each
            minibatch is moved to each model's device.
        layers_a: layers of A: ``"auto"`` or names / glob patterns (:func:`find_layers`).
        layers_b: layers of B.
        batch_size: minibatch size for tensors and datasets (a DataLoader keeps its own); at least 4. Default:
            ``N // 8`` clipped to [4, 256], which cuts the probe into 8 (or 9) minibatches up to 2048 images (32 for
            256 images) and into minibatches of 256 beyond, since the standard errors are a jackknife over minibatches,
            read with Student's t on ``M - 1`` degrees of freedom, and nearly useless below ``M = 4``; 32 for data
            of unknown length. A probe of fewer than 4 minibatches warns, naming the fix (``batch_size <= N / 4``).
        reduction: ``"flatten"``, ``"cls"`` or ``"mean"`` for A's outputs.
        reduction_b: the same for B (default: ``reduction``).
        input_key: key of the images in dict batches.
        label_key: key of the labels in dict batches.
        analyses: what to measure, as :class:`lightning_cka.CKAMonitor` takes it (default: ``cka``, ``attention``,
            ``heads``, ``residual`` and ``rank``; e.g. ``["default", "linear_probe"]``). An analysis named here that
            does not apply to the models, or fails on them, is left out with a warning.
        label_b: how figures name model B (default: its class name).
        seed: seed of the permutations.

    Returns:
        A :class:`CKAResult` with ``intra`` (A), ``reference_intra`` (B), ``reference`` (A x B), their standard
        errors (``*_se``) and null thresholds (``*_null``), and the other analyses' fields.

    Example:
        >>> import timm, torch
        >>> from lightning_cka import compare_models
        >>> vit, resnet = timm.create_model("test_vit"), timm.create_model("test_resnet")
        >>> result = compare_models(vit, resnet, data=torch.randn(16, 3, 160, 160))  # 4 minibatches of 4
        >>> result.intra.shape, result.reference.shape, result.mean_attention_distance.shape
        ((6, 6), (6, 4), (6, 2))
    """
    if batch_size is None:
        batch_size = default_batch_size(_length(data))
    batch_size = options.integer("compare_models", "batch_size", batch_size, MIN_BATCH, hint="CKA needs 4 examples")
    resolved = resolve_analyses(analyses)
    models = [ProbedModel("model", model_a, layers_a, reduction)]
    if model_b is not None:
        label = label_b or type(model_b).__name__
        models.append(ProbedModel("reference", model_b, layers_b, reduction_b or reduction, label=label))
    engine = ProbeEngine(models, [analysis for analysis, _ in resolved], seed=seed)
    named = {analysis.name for analysis, explicit in resolved if explicit}
    for name, reason in engine.skipped.items():
        if name in named:
            warnings.warn(f"compare_models: the {name} analysis is left out: {reason}.", UserWarning, stacklevel=2)
    minibatches, count = iterate_batches(data, batch_size, input_key, label_key)
    if count is None:  # an iterable without a length: the per-minibatch states need the count up front
        minibatches = list(minibatches)
        count = len(minibatches)
    hasher = ProbeHasher()
    seen: list[int] = []
    batches = _numbered(minibatches, hasher, seen)
    engine.run(batches, max(count, 1), models[0].device)
    if hasher.count == 0:
        raise ValueError("data yielded no minibatch of at least 4 examples.")
    if len(seen) < FEW_MINIBATCHES:
        warnings.warn(few_minibatches(len(seen), hasher.count, isinstance(data, DataLoader)), UserWarning, stacklevel=2)
    failed = {name: describe_error(err) for name, err in engine.failures.items()}
    fields = engine.compute(skip=list(failed))
    failed |= {name: describe_error(err) for name, err in engine.finalize_failures.items()}
    for name, error in failed.items():
        warnings.warn(
            f"compare_models: the {name} analysis failed ({error}) and is left out.", UserWarning, stacklevel=2
        )
    settings = {
        "layers": layers_a if isinstance(layers_a, str) else list(layers_a),
        "reduction": reduction,
        "reference": None if model_b is None else {"layers": layers_b, "reduction": reduction_b or reduction},
        "batch_size": batch_size,
        "seed": seed,
        "left_out": {**engine.skipped, **failed},
    }
    fields |= {"num_examples": hasher.count, "probe_hash": hasher.hexdigest(), "settings": json.dumps(settings)}
    return CKAResult(fields, analyses=engine.result_analyses(skip=list(failed)))


FEW_MINIBATCHES = 4  # below it, the jackknife's standard errors rest on too few degrees of freedom to be read
DEFAULT_MINIBATCHES = 8  # what the default batch size aims for
MAX_DEFAULT_BATCH = 256


def default_batch_size(num_examples: int | None) -> int:
    """The default minibatch size for ``num_examples`` probe images: 8 minibatches or more, of at most 256 images.

    ``N // 8`` clipped to [4, 256]; 32 when the length is unknown.

    Example:
        >>> [default_batch_size(n) for n in (16, 100, 256, 1000, 5000, None)]
        [4, 12, 32, 125, 256, 32]
    """
    if num_examples is None:
        return 32
    return min(MAX_DEFAULT_BATCH, max(MIN_BATCH, num_examples // DEFAULT_MINIBATCHES))


def few_minibatches(minibatches: int, num_examples: int, loader: bool = False) -> str:
    """The warning for a probe of fewer than 4 minibatches: what it costs and the fix."""
    from lightning_cka.stats import t_critical

    quantile = float(t_critical(0.95, minibatches - 1)) if minibatches > 1 else float("nan")
    cost = (
        f"its standard errors rest on {minibatches - 1} degree(s) of freedom (a 95% interval is ± {quantile:.1f} se)"
        if minibatches > 1
        else "it has no standard errors at all"
    )
    where = "the DataLoader's batch_size" if loader else "batch_size"
    return (
        f"compare_models: the probe of {num_examples} images came in {minibatches} minibatch(es), so {cost}; use "
        f"{where} <= N/4 (here <= {max(MIN_BATCH, num_examples // FEW_MINIBATCHES)}) for 4 minibatches or more, "
        "8 or more for error bars worth reading."
    )


def _length(data: Any) -> int | None:
    """How many examples ``data`` holds (a tensor or a map-style dataset), or ``None`` (a loader keeps its own)."""
    if isinstance(data, Tensor):
        return int(data.shape[0])
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        try:
            return len(data)  # type: ignore[arg-type]
        except TypeError:
            return None
    return None


def _numbered(minibatches: Any, hasher: ProbeHasher, seen: list[int]) -> Any:
    """The minibatches as numbered :class:`ProbeBatch` es, made lazily (one minibatch of images in memory at a time)."""
    start = 0
    for index, (inputs, labels) in enumerate(minibatches):
        hasher.update(inputs)
        seen.append(inputs.shape[0])
        yield ProbeBatch(index, start, inputs, labels)
        start += inputs.shape[0]

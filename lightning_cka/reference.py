"""The reference model of a probe: what it is, how figures name it, and how it is built, frozen.

Building it leaves every RNG as it was.
"""

import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from lightning_cka import models as _models  # noqa: F401  (checkpoints may name resnet18_cifar)
from lightning_cka.engine import options as check
from lightning_cka.engine.analysis import json_ready
from lightning_cka.taps.grams import REDUCTIONS, Reduction
from lightning_cka.taps.layers import LayerSpec
from lightning_cka.taps.probe_mode import preserved_rng


class Reference:
    """A frozen model to compare with (the columns of ``cka/reference``), and how to build it.

    Args:
        model: an ``nn.Module`` (used as is); a timm model name (created with ``timm.create_model``); or the path
            (``str`` or ``os.PathLike``) of a Lightning checkpoint whose hyperparameters name its timm architecture as
            ``timm_name`` (and ``timm_kwargs``), as ``examples/train.py`` saves them.
        weights: weights for a named model: a state dict file or a (Lightning) checkpoint of another run.
        pretrained: let timm download its pretrained weights for a named model (needs internet).
        kwargs: keyword arguments for ``timm.create_model`` of a named model (``num_classes``, ``img_size``, ...).
        layers: ``"auto"`` or names / glob patterns, see :func:`lightning_cka.find_layers`.
        reduction: what each reference layer's output becomes before its Gram (default: the model's reduction; a CNN
            next to a ``"cls"`` model takes ``"mean"``).

    Raises:
        ValueError: naming the argument and what it takes.

    Example:
        >>> Reference("resnet18", weights="runs/resnet/version_0/checkpoints/last.ckpt").settings()["weights"]
        'runs/resnet/version_0/checkpoints/last.ckpt'
    """

    def __init__(
        self,
        model: nn.Module | str | os.PathLike,
        weights: str | os.PathLike | None = None,
        pretrained: bool = False,
        kwargs: dict[str, Any] | None = None,
        layers: LayerSpec = "auto",
        reduction: Reduction | None = None,
    ) -> None:
        owner = "Reference"
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if not isinstance(model, nn.Module | str) or model == "":
            raise ValueError(
                f"{owner}: model must be an nn.Module, a timm model name or a checkpoint path, got "
                f"{type(model).__name__} {model!r}."
            )
        if isinstance(weights, os.PathLike):
            weights = os.fspath(weights)
        if weights is not None and (not isinstance(weights, str) or not weights):
            raise ValueError(f"{owner}: weights must be a file path (str or os.PathLike), got {weights!r}.")
        pretrained = check.flag(owner, "pretrained", pretrained)
        if kwargs is not None:
            if not isinstance(kwargs, dict):
                raise ValueError(f"{owner}: kwargs must be a dict of timm.create_model arguments, got {kwargs!r}.")
            json_ready(f"{owner}: kwargs", kwargs)
        if isinstance(model, nn.Module) and (weights is not None or pretrained or kwargs):
            raise ValueError(f"{owner}: weights, pretrained and kwargs apply to a model given by name or checkpoint.")
        self.model, self.weights, self.pretrained, self.kwargs = model, weights, pretrained, kwargs
        self.layers = check.layer_spec(owner, "layers", layers)
        self.reduction = check.choice(owner, "reduction", reduction, (*REDUCTIONS, None))

    @classmethod
    def of(cls, value: "Reference | nn.Module | str | os.PathLike | None") -> "Reference | None":
        """``value`` as a :class:`Reference` (a module, name or path becomes one with default options)."""
        if value is None or isinstance(value, Reference):
            return value
        return cls(value)

    def describe(self) -> tuple[str, bool]:
        """How figures name the reference, and whether it is an untrained timm model (:func:`describe_reference`)."""
        return describe_reference(self.model, self.weights, self.pretrained)

    def build(self, device: torch.device | str = "cpu") -> nn.Module:
        """The frozen reference on ``device``, built without drawing from any global RNG.

        A timm model's random initialization included: the training run's random stream is left where it was.
        """
        with preserved_rng():
            module = load_reference(self.model, self.weights, self.pretrained, self.kwargs)
        return module.to(device)

    def settings(self) -> dict[str, Any]:
        """The reference as plain types, for checkpoints and probe files (a module is named by its class)."""
        model = self.model if isinstance(self.model, str) else f"<{type(self.model).__name__} module>"
        return {
            "model": model,
            "weights": self.weights,
            "pretrained": self.pretrained,
            "kwargs": self.kwargs,
            "layers": self.layers if isinstance(self.layers, str) else list(self.layers),
            "reduction": self.reduction,
        }

    def __repr__(self) -> str:
        return f"Reference({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"


def load_reference(
    reference: nn.Module | str | os.PathLike,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A reference model in eval mode with gradients off.

    Args:
        reference: an ``nn.Module`` (used as is); a timm model name created with ``timm.create_model`` (no download
            unless ``pretrained``); or the path of a Lightning checkpoint whose hyperparameters name the architecture
            as ``timm_name`` (and ``timm_kwargs``), as ``examples/train.py`` saves them.
        weights: a file holding a plain state dict, a ``{"state_dict": ...}`` / ``{"model": ...}`` checkpoint, or a
            Lightning checkpoint of another run. Keys may carry a prefix (``model.`` from a LightningModule attribute,
            ``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``); it is found and removed.
        pretrained: let timm download its pretrained weights (needs internet).
        model_kwargs: keyword arguments for ``timm.create_model`` (``num_classes``, ``img_size``, ``patch_size``...).

    Returns:
        The frozen model.

    Raises:
        ValueError: unknown timm name, or a weights file that does not fit the model (the message names missing and
            unexpected keys).
    """
    if isinstance(reference, str | os.PathLike) and Path(reference).is_file():
        if weights is not None:
            raise ValueError(f"reference {reference} is already a checkpoint; leave reference_weights out.")
        name, saved_kwargs = _architecture(Path(reference))
        reference, weights, model_kwargs = name, os.fspath(reference), {**saved_kwargs, **(model_kwargs or {})}
    if isinstance(reference, str):
        if not timm.is_model(reference):
            raise ValueError(
                f"{reference!r} is neither a file nor a timm model name; see timm.list_models() for the names."
            )
        model = timm.create_model(reference, pretrained=pretrained, **(model_kwargs or {}))
    elif isinstance(reference, nn.Module):
        if model_kwargs or pretrained:
            raise ValueError("reference_kwargs and reference_pretrained only apply to a timm model name.")
        model = reference
    else:
        raise TypeError(f"reference must be an nn.Module or a timm model name, got {type(reference).__name__}.")
    if weights is not None:
        model.load_state_dict(_matching_state_dict(model, _read_state_dict(Path(weights))))
    model.eval()
    model.requires_grad_(False)
    return model


def _short_path(path: str | Path, keep: int = 3) -> str:
    """The last ``keep`` parts of a checkpoint's path, Lightning's ``checkpoints`` folder left out, for titles.

    Example:
        >>> _short_path("/home/me/runs/resnet/version_0/checkpoints/last.ckpt")
        '…/resnet/version_0/last.ckpt'
        >>> _short_path("last.ckpt")
        'last.ckpt'
    """
    parts = [part for part in Path(path).parts if part != "checkpoints"]
    return str(Path(*parts[-keep:])) if len(parts) <= keep else "…/" + "/".join(parts[-keep:])


def describe_reference(
    reference: nn.Module | str | Path, weights: str | Path | None = None, pretrained: bool = False
) -> tuple[str, bool]:
    """How figures name a reference, and whether it is an untrained timm model (random weights).

    Returns:
        ``("resnet18_cifar, trained (…/resnet/version_0/last.ckpt)", False)`` (the path's last parts),
        ``("resnet18, untrained (random weights)", True)``, ``("ResNet (a module passed in)", False)``...
    """
    if isinstance(reference, nn.Module):
        return f"{type(reference).__name__} (a module passed in)", False
    if Path(reference).is_file():
        name, _ = _architecture(Path(reference))
        return f"{name}, trained ({_short_path(reference)})", False
    if weights is not None:
        return f"{reference}, trained ({_short_path(weights)})", False
    if pretrained:
        return f"{reference}, timm's pretrained weights", False
    return f"{reference}, untrained (random weights)", True


def _architecture(path: Path) -> tuple[str, dict[str, Any]]:
    """The timm name and keyword arguments saved in a checkpoint's hyperparameters."""
    hparams = _read(path).get("hyper_parameters") or {}
    if "timm_name" not in hparams:
        raise ValueError(
            f"{path} does not say which model it holds (no 'timm_name' hyperparameter): pass the timm model name as "
            "the reference and this file as its weights."
        )
    return hparams["timm_name"], dict(hparams.get("timm_kwargs") or {})


def _read(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"reference weights file {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"could not read {path} as tensors only ({err.__class__.__name__}: {err}). Save the weights with "
            "torch.save(model.state_dict(), path) and pass that file."
        ) from err


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = _read(path)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of parameter names to tensors).")
    return checkpoint


def _matching_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under the prefix that matches most of the model's own keys, with the prefix removed."""
    own = set(model.state_dict())
    counts: dict[str, int] = {}
    for key in state:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in own:
                prefix = "".join(f"{part}." for part in parts[:i])
                counts[prefix] = counts.get(prefix, 0) + 1
                break
    prefix = max(counts, key=lambda p: (counts[p], -len(p)), default="")
    matched = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    own_shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    missing, unexpected = sorted(own - set(matched)), sorted(set(matched) - own)
    reshaped = [
        f"{name} {tuple(value.shape)} vs {own_shapes[name]}"
        for name, value in matched.items()
        if name in own_shapes and tuple(value.shape) != own_shapes[name]
    ]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"the reference weights do not fit {type(model).__name__} (prefix {prefix!r} removed): "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}, other shapes (file vs model) {_few(reshaped)}. "
            "Check the model name and reference_kwargs (num_classes, img_size, patch_size...)."
        )
    return matched


def _few(items: list[str]) -> str:
    return f"{items[:3]}{' ...' if len(items) > 3 else ''}"

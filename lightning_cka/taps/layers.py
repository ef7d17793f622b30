"""Choosing which modules of a model to monitor."""

import difflib
import fnmatch
from collections.abc import Sequence

from torch import nn

from lightning_cka.taps.unwrap import unwrap_model

LayerSpec = str | Sequence[str]


def find_layers(model: nn.Module, spec: LayerSpec = "auto") -> list[str]:
    """Ordered names of the modules to monitor.

    ``"auto"`` finds the residual blocks of the first submodule (in module order, the model itself first) whose
    structure it recognizes:

    ========================================  ===============================  ==============================
    family                                    recognized by                    layers
    ========================================  ===============================  ==============================
    ConvNeXt, Swin, PiT and other stage       a container of stages that       ``stages.i.blocks.j``
    models                                    all have ``blocks``
    EfficientNet, MobileNet                   ``blocks`` of ``Sequential``     ``blocks.i.j``
    ViT, DeiT, CaiT, XCiT and other           ``blocks`` of blocks (and the    ``blocks.i``, then
    ``.blocks`` models                        class-token blocks after them)   ``blocks_token_only.j``
    ResNet style (timm and torchvision)       ``layer1``, ``layer2``, ...      ``layer1.0`` ... ``layer4.2``
    torchvision ViT, encoder models           ``encoder.layers``               ``encoder.layers.i``
    Hugging Face ViT, DeiT, Dinov2            the encoder's blocks             ``layers.i`` (transformers 5)
                                                                               or ``encoder.layer.i``
    Hugging Face Swin                         ``encoder.layers`` of stages     ``encoder.layers.i.blocks.j``
    Hugging Face ConvNext, ResNet             ``stages`` holding ``layers``    ``encoder.stages.i.layers.j``
    torchvision ConvNeXt, Swin, EfficientNet  2+ stages, each holding blocks   the blocks of every stage
    and RegNet, timm RegNet                   of one class (the patch          (``features.1.0``, ...,
                                              embedding, downsampling          ``s1.b1``, ...)
                                              and heads left out)
    anything else                             the largest ``Sequential`` /     its children
                                              ``ModuleList`` (2+ children)
    no container at all                       leaf modules with parameters     those leaves
    ========================================  ===============================  ==============================

    Otherwise ``spec`` is a name or glob pattern, or a list of them. Patterns match dot-separated name segments:
    ``*`` matches within one segment (``"blocks.*"`` gives ``blocks.0``, ``blocks.1``, ... but not
    ``blocks.0.attn``), ``**`` matches any number of segments, ``?`` and ``[...]`` as in :mod:`fnmatch`. A name or
    pattern may leave out leading segments: ``"blocks.*.mlp.fc1"`` also matches ``model.blocks.3.mlp.fc1`` inside a
    LightningModule. An exact name must then resolve to one module. Each entry contributes its matches in module
    order, entries in the order given, without duplicates.

    Wrappers (``DistributedDataParallel``, ``DataParallel``, ``torch.compile``) are looked through, so names never
    carry ``module.`` or ``_orig_mod.``.

    Args:
        model: the model.
        spec: ``"auto"``, or names / glob patterns.

    Returns:
        Module names as in ``model.named_modules()`` (without ``_orig_mod.`` segments of compiled submodules).

    Raises:
        ValueError: an entry matches no module (the message lists the closest names) or an exact name is ambiguous.

    Example:
        >>> import timm
        >>> from lightning_cka import find_layers
        >>> find_layers(timm.create_model("test_resnet"))
        ['layer1.0', 'layer2.0', 'layer3.0', 'layer4.0']
        >>> find_layers(timm.create_model("test_vit"), ["blocks.[0-2].attn", "blocks.5.mlp.fc?"])
        ['blocks.0.attn', 'blocks.1.attn', 'blocks.2.attn', 'blocks.5.mlp.fc1', 'blocks.5.mlp.fc2']

    """
    model = unwrap_model(model)
    if isinstance(spec, str) and spec == "auto":
        return _auto_layers(model)
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries:
        raise ValueError("layers must be 'auto' or a non-empty list of module names / glob patterns, got [].")
    names = [name for name in named_modules(model) if name]
    found: dict[str, None] = {}
    for entry in entries:
        for name in _resolve(entry, names):
            found.setdefault(name, None)
    return list(found)


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``model.named_modules()`` as a dict, looking through wrappers.

    The ``_orig_mod`` segment of a ``torch.compile``d submodule is left out of the names and the compiled wrapper is
    replaced by the module it wraps, whose hooks fire when the wrapper runs eagerly.
    """
    modules: dict[str, nn.Module] = {}
    for name, module in unwrap_model(model).named_modules():
        modules[".".join(part for part in name.split(".") if part != "_orig_mod")] = module
    return modules


def _resolve(entry: str, names: list[str]) -> list[str]:
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"layer names and patterns must be non-empty strings, got {entry!r}.")
    if entry in names:
        return [entry]
    pattern = ["**", *entry.split(".")]
    matches = [name for name in names if _match_segments(pattern, name.split("."))]
    if not matches:
        close = difflib.get_close_matches(entry, names, n=5, cutoff=0.5) or names[:5]
        raise ValueError(f"no module matches {entry!r}. Closest module names: {', '.join(close)}.")
    if not _is_glob(entry) and len(matches) > 1:
        raise ValueError(f"{entry!r} could mean any of {', '.join(matches)}: give the full name.")
    return matches


def _is_glob(entry: str) -> bool:
    return any(c in entry for c in "*?[")


def _match_segments(pattern: list[str], name: list[str]) -> bool:
    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match_segments(rest, name[i:]) for i in range(len(name) + 1))
    return bool(name) and fnmatch.fnmatchcase(name[0], head) and _match_segments(rest, name[1:])


def _auto_layers(model: nn.Module) -> list[str]:
    return family_layers(model) or _fallback_layers(model)


def family_layers(model: nn.Module) -> list[str]:
    """The residual blocks of the first submodule whose family ``find_layers`` recognizes (``[]`` when none is)."""
    for prefix, module in named_modules(model).items():
        found = _family_layers(module)
        if found:
            return [f"{prefix}.{name}" if prefix else name for name in found]
    return []


def _family_layers(module: nn.Module) -> list[str]:
    # Hugging Face models: their encoder's blocks (the names differ between transformers 4 and 5).
    hf = _hf_layers(module)
    if hf:
        return hf
    # Stage models: a container of stages that each hold ``blocks`` (ConvNeXt and Swin ``stages`` / ``layers``, PiT
    # ``transformers``); the patch embedding is left alone (a hybrid ViT's CNN backbone has stages too).
    for stages_attr, stages in module.named_children():
        if stages_attr == "patch_embed":
            continue
        if _is_container(stages) and all(_is_container(getattr(s, "blocks", None)) for s in stages):
            return [
                f"{stages_attr}.{i}.blocks.{j}"
                for i, stage in stages.named_children()
                for j in _child_names(stage.blocks)
            ]
    blocks = getattr(module, "blocks", None)
    if _is_container(blocks):
        if all(_is_container(b) for b in blocks):
            return [f"blocks.{i}.{j}" for i, stage in blocks.named_children() for j in _child_names(stage)]
        # CaiT and XCiT add their class token after the patch blocks, in blocks of their own.
        later = next(
            (a for a in ("blocks_token_only", "cls_attn_blocks") if _is_container(getattr(module, a, None))), ""
        )
        tail = [f"{later}.{j}" for j in _child_names(getattr(module, later))] if later else []
        return [f"blocks.{i}" for i in _child_names(blocks)] + tail
    resnet_stages = []
    while _is_container(getattr(module, f"layer{len(resnet_stages) + 1}", None)):
        resnet_stages.append(getattr(module, f"layer{len(resnet_stages) + 1}"))
    if resnet_stages:
        return [f"layer{i + 1}.{j}" for i, stage in enumerate(resnet_stages) for j in _child_names(stage)]
    encoder_layers = getattr(getattr(module, "encoder", None), "layers", None)
    if _is_container(encoder_layers) and all(_is_container(getattr(s, "blocks", None)) for s in encoder_layers):
        return [  # stages of blocks in an encoder (Hugging Face Swin)
            f"encoder.layers.{i}.blocks.{j}"
            for i, stage in encoder_layers.named_children()
            for j in _child_names(stage.blocks)
        ]
    if _is_container(encoder_layers):  # torchvision's VisionTransformer
        return [f"encoder.layers.{i}" for i in _child_names(encoder_layers)]
    return _stage_blocks(module)


def _hf_layers(module: nn.Module) -> list[str]:
    """The blocks of a Hugging Face model's encoder (by attribute names, so that transformers is never imported).

    ViT and DeiT: ``layers.i`` (transformers 5) or ``encoder.layer.i`` (4, and Dinov2 in both); ConvNext and ResNet:
    ``encoder.stages.s.layers.j``; Swin (``encoder.layers.s.blocks.j``) is found by the rule for stages of blocks.
    """
    if not type(module).__module__.startswith("transformers."):
        return []
    for path in ("encoder.layer", "layers"):
        blocks = module.get_submodule(path) if _has(module, path) else None
        if _is_container(blocks) and _is_block_stage(blocks):
            return [f"{path}.{i}" for i in _child_names(blocks)]
    stages = getattr(module, "stages", None)
    if _is_container(stages) and all(_is_container(getattr(s, "layers", None)) for s in stages):
        return [f"stages.{i}.layers.{j}" for i, stage in stages.named_children() for j in _child_names(stage.layers)]
    return []


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _stage_blocks(module: nn.Module) -> list[str]:
    """The blocks of 2+ stages that each hold blocks of one class, in the module or one of its containers.

    torchvision keeps its stages in ``features`` (ConvNeXt, Swin, EfficientNet) or ``trunk_output`` (RegNet) between a
    patch embedding, downsampling layers and a head; timm's RegNet names them ``s1``, ``s2``, ... A stage is a module
    whose children are all instances of one class defined outside ``torch.nn`` (a block, not a ``Conv2d`` / norm
    sequence).
    """
    for prefix, owner in [("", module), *((f"{n}.", c) for n, c in module.named_children() if _is_container(c))]:
        stages = [(name, child) for name, child in owner.named_children() if _is_block_stage(child)]
        if len(stages) >= 2:
            return [f"{prefix}{name}.{j}" for name, stage in stages for j in _child_names(stage)]
    return []


def _is_block_stage(module: nn.Module) -> bool:
    classes = {type(child) for child in module.children()}
    if len(classes) != 1:
        return False
    (cls,) = classes
    return not cls.__module__.startswith("torch.nn") and not isinstance(module, nn.ModuleDict)


def _fallback_layers(model: nn.Module) -> list[str]:
    best_name, best = None, None
    for name, module in named_modules(model).items():
        if _is_container(module) and len(module) >= 2 and (best is None or len(module) > len(best)):
            best_name, best = name, module
    if best is not None:
        return [f"{best_name}.{i}" if best_name else i for i in _child_names(best)]
    leaves = [
        name
        for name, module in named_modules(model).items()
        if name and not list(module.children()) and any(True for _ in module.parameters(recurse=False))
    ]
    if not leaves:
        raise ValueError(f"found no layers to monitor in {type(model).__name__}: pass layer names explicitly.")
    return leaves


def _child_names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_children()]


def _is_container(module: object) -> bool:
    return isinstance(module, nn.Sequential | nn.ModuleList) and len(module) > 0


def display_names(model: nn.Module, names: list[str]) -> list[str]:
    """Layer names without the attribute path that leads to the network holding them.

    ``model.blocks.0`` inside a LightningModule becomes ``blocks.0``: the path is followed down from the root while a
    single child that is not a ``Sequential`` / ``ModuleList`` holds every layer, and only that path is removed.
    """
    model = unwrap_model(model)
    children = dict(model.named_children())
    heads = {name.split(".", 1)[0] for name in names}
    if len(heads) != 1 or not all("." in name for name in names):
        return list(names)
    head = heads.pop()
    child = children.get(head)
    if child is None or isinstance(child, nn.Sequential | nn.ModuleList):
        return list(names)
    return display_names(child, [name.split(".", 1)[1] for name in names])

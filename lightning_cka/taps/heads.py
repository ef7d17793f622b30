"""The head tap: the centered Gram of every attention head's output, per attention module."""

from collections.abc import Mapping, Sequence

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_cka.functional.grams import head_grams
from lightning_cka.taps.attention_capture import head_outputs
from lightning_cka.taps.attention_site import AttentionSite
from lightning_cka.taps.base import Tap
from lightning_cka.taps.grams import Reduction, TokenLayout, reduce_output


class HeadGrams(Tap):
    """The centered Gram of every attention head's output, per attention module, from the input of its projection.

    The heads' outputs are the input of the module's output projection (``site.proj``: timm's ``attn.proj``, Hugging
    Face's ``o_proj`` / ``attention.output.dense``), or, where no module receives them (torchvision applies its output
    projection functionally), ``probabilities @ v`` formed again from the attention module's input
    (:func:`lightning_cka.taps.attention_capture.head_outputs`). Swin's windows are laid side by side per image.
    The hook reduces each head's ``(B, T, d)`` slice like :func:`lightning_cka.taps.grams.reduce_output` reduces a
    layer (``flatten``: all ``T·d`` features; ``mean``: the mean over patch tokens, prefix tokens left out; ``cls``:
    token 0) and keeps only its ``(B, B)`` Gram, so nothing of the activation outlives the hook. With ``scale_norm`` or
    ``gated`` attention, ``proj``'s input is the normalized / gated head output: that is what the projection mixes.

    Args:
        sites: the attention modules.
        head_dims: each module's channels per head.
        reduction: the model's reduction.
        layouts: each module's token layout (its prefix tokens and whether it has a class token).
    """

    def __init__(
        self, sites: Sequence[AttentionSite], head_dims: Sequence[int], reduction: Reduction, layouts: list[TokenLayout]
    ) -> None:
        self.sites = list(sites)
        self.head_dims = list(head_dims)
        self.reduction = reduction
        self.layouts = layouts
        self.key = ("head_grams", tuple(site.name for site in self.sites), reduction)
        self._grams: dict[int, list[Tensor]] = {}
        self._batch_size: int | None = None

    @override
    def hooks(self, modules: Mapping[str, nn.Module]) -> list[RemovableHandle]:
        handles = []
        for layer, site in enumerate(self.sites):
            if site.proj or site.kind == "timm":
                handles.append(self.on_input(modules[site.proj or f"{site.name}.proj"], self._hook(layer)))
            else:
                handles.append(self.on_input(modules[site.name], self._formed(layer), with_kwargs=True))
        return handles

    def _formed(self, layer: int):
        site, record = self.sites[layer], self._hook(layer)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            record(module, (head_outputs(site, module, args, kwargs),))

        return hook

    @override
    def begin(self, inputs: Tensor | None) -> None:
        self._grams = {}
        self._batch_size = None if inputs is None else inputs.shape[0]

    def _hook(self, layer: int):
        site, head_dim, layout = self.sites[layer], self.head_dims[layer], self.layouts[layer]
        width = site.num_heads * head_dim
        where = site.proj or (f"{site.name}.proj" if site.kind == "timm" else site.name)

        def hook(module: nn.Module, args: tuple) -> None:
            if layer in self._grams:
                raise RuntimeError(
                    f"'{where}' ran more than once in one forward pass, so its heads have no single output. Leave the "
                    "heads analysis out."
                )
            x = args[0] if args else None
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != width:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise RuntimeError(
                    f"'{where}' got {shape}, not (B, T, {width}) = {site.num_heads} heads x {head_dim}: its attention "
                    "module does not compute what lightning-cka expects. Leave the heads analysis out."
                )
            batch = self._batch_size
            if site.windowed and batch and x.shape[0] != batch and x.shape[0] % batch == 0:
                x = x.reshape(batch, -1, width)  # (B·nW, T, C) windows of each image side by side: (B, nW·T, C)
            if batch is not None and x.shape[0] != batch:
                raise RuntimeError(
                    f"'{where}' got {x.shape[0]} examples, but the batch has {batch}: the heads of a module that folds "
                    "other dims into the batch cannot be compared. Leave the heads analysis out."
                )
            features = reduce_output(x, self.reduction, layout, site.name)  # (B, T, H·d) or (B, H·d)
            heads = features.unflatten(-1, (site.num_heads, head_dim))  # (B, [T,] H, d), head-major channels
            self._grams[layer] = list(head_grams(heads).unbind(0))

        return hook

    @override
    def collect(self) -> list[list[Tensor]]:
        missing = [site.name for layer, site in enumerate(self.sites) if layer not in self._grams]
        if missing:
            raise RuntimeError(
                f"attention module(s) {', '.join(missing)} did not run in the latest forward pass (or no forward pass "
                "ran). Leave the heads analysis out."
            )
        return [self._grams[layer] for layer in range(len(self.sites))]


def head_dim(modules: Mapping[str, nn.Module], site: AttentionSite) -> int:
    """Channels per head of the attention module ``site``, checked against its projection (``ValueError`` if not).

    A site without a projection module (torchvision's) has its heads formed again from its input: its own head size.
    """
    attention = modules[site.name]
    head_dim = site.head_dim or getattr(attention, "head_dim", None)
    if site.kind in ("torchvision_mha", "torchvision_swin") and isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    proj = modules.get(site.proj or f"{site.name}.proj")
    width = site.num_heads * head_dim if isinstance(head_dim, int) else None
    if not isinstance(proj, nn.Linear) or proj.in_features != width:
        raise ValueError(
            f"attention module '{site.name}' has no nn.Linear projection taking its {site.num_heads} heads x "
            f"{head_dim} channels, so its heads cannot be read. Leave the heads analysis out."
        )
    return head_dim

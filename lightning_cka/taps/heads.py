"""The head tap: the centered Gram of every attention head's output, per timm attention module."""

from collections.abc import Mapping, Sequence

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_cka.functional.grams import head_grams
from lightning_cka.taps.attention import AttentionSite
from lightning_cka.taps.base import Tap
from lightning_cka.taps.grams import Reduction, TokenLayout, reduce_output


class HeadGrams(Tap):
    """The centered Gram of every attention head's output, per attention module, from the input of ``attn.proj``.

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
        return [self.on_input(modules[f"{site.name}.proj"], self._hook(layer)) for layer, site in enumerate(self.sites)]

    @override
    def begin(self, inputs: Tensor | None) -> None:
        self._grams = {}
        self._batch_size = None if inputs is None else inputs.shape[0]

    def _hook(self, layer: int):
        site, head_dim, layout = self.sites[layer], self.head_dims[layer], self.layouts[layer]
        width = site.num_heads * head_dim

        def hook(module: nn.Module, args: tuple) -> None:
            if layer in self._grams:
                raise RuntimeError(
                    f"'{site.name}.proj' ran more than once in one forward pass, so its heads have no single output. "
                    "Leave the heads analysis out."
                )
            x = args[0] if args else None
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != width:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise RuntimeError(
                    f"'{site.name}.proj' got {shape}, not (B, T, {width}) = {site.num_heads} heads x {head_dim}: its "
                    "forward is not the one of timm.layers.Attention. Leave the heads analysis out."
                )
            if self._batch_size is not None and x.shape[0] != self._batch_size:
                raise RuntimeError(
                    f"'{site.name}.proj' got {x.shape[0]} examples, but the batch has {self._batch_size}: the heads of "
                    "a module that folds other dims into the batch cannot be compared. Leave the heads analysis out."
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
    """Channels per head of the attention module ``site``, checked against its ``proj`` (``ValueError`` if not)."""
    attention = modules[site.name]
    proj = modules.get(f"{site.name}.proj")
    head_dim = getattr(attention, "head_dim", None)
    width = site.num_heads * head_dim if isinstance(head_dim, int) else None
    if not isinstance(proj, nn.Linear) or proj.in_features != width:
        raise ValueError(
            f"attention module '{site.name}' has no nn.Linear 'proj' taking its {site.num_heads} heads x "
            f"{head_dim} channels, so its heads cannot be read. Leave the heads analysis out."
        )
    return head_dim

"""Forward hooks that reduce each monitored layer's output to its Gram matrix as it is produced."""

from contextlib import ExitStack
from typing import Literal

from torch import Tensor, nn

from lightning_cka.functional.hsic import gram
from lightning_cka.metrics.attention_distance import MeanAttentionDistance
from lightning_cka.taps.attention import AttentionTap, PatchGeometry, is_supported_attention, patch_geometry
from lightning_cka.taps.layers import LayerSpec, find_layers, named_modules
from lightning_cka.taps.probe_mode import probe_mode
from lightning_cka.taps.unwrap import model_device, unwrap_model

Reduction = Literal["flatten", "cls", "mean"]
REDUCTIONS = ("flatten", "cls", "mean")


class Recorder:
    """Record the ``(n, n)`` Gram matrix of every chosen layer's output while a model runs.

    Inside ``with Recorder(model, layers) as rec:`` every call of ``model`` is a probe pass: eval mode, no autograd,
    compiled modules run eagerly, and on exit every ``training`` flag and the global RNG states are restored and the
    hooks removed (also when the forward raises); see :func:`lightning_cka.taps.probe_mode.probe_mode`. Each hook turns
    its layer's output into a Gram matrix on the spot and keeps only that, so memory is ``O(layers × n²)`` whatever
    the feature size, and an in-place op that later overwrites the output (``nn.ReLU(inplace=True)``) cannot change
    what was recorded.

    A module that runs more than once in one forward pass (one ``nn.ReLU`` used twice) has no single output: the
    hook raises ``RuntimeError`` naming it; monitor its parent block or a module that runs once.

    Args:
        model: the model to probe; call it (not a submodule) inside the ``with`` block. DDP / DataParallel /
            ``torch.compile`` wrappers are looked through.
        layers: ``"auto"`` or names / glob patterns, see :func:`lightning_cka.find_layers`.
        reduction: what each layer's output becomes before its Gram (tuple outputs use their first tensor):
            ``"flatten"``: all features (tokens x channels, or C x H x W), as in the paper's code; ``"cls"``: the first
            prefix (CLS) token of ``(n, T, D)`` token outputs; ``"mean"``: the mean over patch tokens (prefix tokens
            left out) of token outputs, or the spatial mean of ``(n, C, H, W)`` conv maps.
        attention: record the mean attention distance of timm ``Attention`` modules: ``"auto"`` when the model has
            them and a ``patch_embed`` geometry, ``True`` to require it, ``False`` to skip.
        renormalize_attention: renormalize attention over patch keys (see
            :func:`lightning_cka.functional.mean_attention_distance`).

    Attributes:
        layers: the monitored module names.
        attention_layers: names of the attention modules whose distances are recorded.
        attention: a :class:`MeanAttentionDistance` accumulating over every forward pass in the ``with`` block (``None``
            without attention).

    Example:
        >>> import timm, torch
        >>> from lightning_cka import MinibatchCKA, Recorder
        >>> model = timm.create_model("test_vit")
        >>> cka = MinibatchCKA()
        >>> with Recorder(model) as rec:
        ...     for _ in range(2):
        ...         _ = model(torch.randn(8, 3, 160, 160))
        ...         cka.update(rec.grams, grams=True)
        >>> rec.layers
        ['blocks.0', 'blocks.1', 'blocks.2', 'blocks.3', 'blocks.4', 'blocks.5']
        >>> cka.compute().shape, rec.attention.compute().shape  # (layers, layers), (attention layers, heads)
        (torch.Size([6, 6]), torch.Size([6, 2]))

    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = "auto",
        reduction: Reduction = "flatten",
        attention: bool | Literal["auto"] = "auto",
        renormalize_attention: bool = False,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        if attention not in (True, False, "auto"):
            raise ValueError(f"attention must be True, False or 'auto', got {attention!r}.")
        self.model = unwrap_model(model)
        self.layers = find_layers(self.model, layers)
        self.reduction = reduction
        self._modules = named_modules(self.model)
        self._taps = self._attention_taps(attention, renormalize_attention)
        self.attention_layers = [tap.name for tap in self._taps]
        self.attention = self._taps[0].sink if self._taps else None
        self._grams: dict[str, Tensor] = {}
        self._batch_size: int | None = None
        self._stack: ExitStack | None = None

    def __enter__(self) -> "Recorder":
        with ExitStack() as stack:
            stack.enter_context(probe_mode(self.model))
            handles = [self.model.register_forward_pre_hook(self._on_forward)]
            handles += [self._modules[name].register_forward_hook(self._gram_hook(name)) for name in self.layers]
            handles += [handle for tap in self._taps for handle in tap.register()]
            for handle in handles:
                stack.callback(handle.remove)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    @property
    def grams(self) -> list[Tensor]:
        """Gram matrices ``(n, n)`` of the latest forward pass, in the order of :attr:`layers`."""
        missing = [name for name in self.layers if name not in self._grams]
        if missing:
            raise RuntimeError(
                f"layer(s) {', '.join(missing)} did not run in the latest forward pass of {type(self.model).__name__}"
                " (or no forward pass ran inside the Recorder). Choose layers the forward pass uses."
            )
        return [self._grams[name] for name in self.layers]

    def _on_forward(self, module: nn.Module, args: tuple) -> None:
        self._grams = {}
        self._batch_size = args[0].shape[0] if args and isinstance(args[0], Tensor) else None

    def _gram_hook(self, name: str):
        prefix_tokens = _num_prefix_tokens(self._modules, name)

        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if name in self._grams:
                raise RuntimeError(
                    f"module '{name}' ran more than once in one forward pass (a module reused at several places, "
                    "like one nn.ReLU called twice), so it has no single output to compare. Monitor its parent block "
                    "or a module that runs once."
                )
            features = _reduce(_first_tensor(output, name), self.reduction, prefix_tokens, name)
            if self._batch_size is not None and features.shape[0] != self._batch_size:
                raise RuntimeError(
                    f"layer '{name}' returned {tuple(features.shape)}, but the batch has {self._batch_size} examples: "
                    "the first dim of a monitored output must be the batch."
                )
            self._grams[name] = gram(features, center=True)

        return hook

    def _attention_taps(self, attention: bool | str, renormalize: bool) -> list[AttentionTap]:
        if attention is False:
            return []
        found = [(name, m) for name, m in self._modules.items() if is_supported_attention(m)]
        geometries = {name: _owner_geometry(self._modules, name) for name, _ in found}
        usable = [(name, m) for name, m in found if geometries[name] is not None]
        if usable:
            geometry = geometries[usable[0][0]]
            usable = [(name, m) for name, m in usable if geometries[name] == geometry]
        if not usable:
            if attention is True:
                raise ValueError(
                    f"attention=True, but {type(self.model).__name__} has no timm Attention module under a model with "
                    "patch_embed.grid_size / patch_size (a timm ViT). Pass attention=False."
                )
            return []
        sink = MeanAttentionDistance(
            num_layers=len(usable),
            num_heads=max(m.num_heads for _, m in usable),
            grid_size=geometry.grid_size,
            patch_size=geometry.patch_size,
            num_prefix_tokens=geometry.num_prefix_tokens,
            renormalize=renormalize,
        ).to(model_device(self.model))
        return [AttentionTap(name, m, i, sink) for i, (name, m) in enumerate(usable)]


def _owners(modules: dict[str, nn.Module], name: str) -> list[nn.Module]:
    """The module called ``name`` and its ancestors, innermost first."""
    parts = name.split(".")
    return [modules[".".join(parts[:i])] for i in range(len(parts), -1, -1)]


def _owner_geometry(modules: dict[str, nn.Module], name: str) -> PatchGeometry | None:
    for owner in _owners(modules, name):
        geometry = patch_geometry(owner)
        if geometry is not None:
            return geometry
    return None


def _num_prefix_tokens(modules: dict[str, nn.Module], name: str) -> int | None:
    for owner in _owners(modules, name):
        if hasattr(owner, "num_prefix_tokens"):
            return int(owner.num_prefix_tokens)
    return None


def _first_tensor(output: object, name: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list):
        for item in output:
            if isinstance(item, Tensor):
                return item
    raise TypeError(
        f"layer '{name}' returned {type(output).__name__}, not a tensor or a tuple holding one: monitor a module "
        "that returns a tensor."
    )


def _reduce(output: Tensor, reduction: str, prefix_tokens: int | None, name: str) -> Tensor:
    if reduction == "flatten" or output.dim() == 2:
        return output
    if output.dim() == 3:
        if reduction == "mean":
            return output[:, prefix_tokens or 0 :].mean(dim=1)  # (n, D) over patch tokens
        if not prefix_tokens:
            raise ValueError(f"reduction='cls' needs a prefix (CLS) token, but layer '{name}' has none: use 'mean'.")
        return output[:, 0]  # (n, D)
    if output.dim() == 4 and reduction == "mean":
        return output.mean(dim=(2, 3))  # (n, C) from (n, C, H, W)
    raise ValueError(
        f"reduction={reduction!r} is not defined for layer '{name}' with output shape {tuple(output.shape)}: 'cls' "
        "needs (n, T, D) tokens, 'mean' needs tokens or (n, C, H, W) maps. Use reduction='flatten' (for a CNN "
        "reference, reference_reduction='mean')."
    )

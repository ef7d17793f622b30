"""``Recorder``: the Gram of every chosen layer (and attention distances) of whatever forward passes run inside it."""

from typing import Literal

from torch import Tensor, nn
from typing_extensions import override

from lightning_cka.metrics.attention_distance import MeanAttentionDistance
from lightning_cka.taps.attention import AttentionSite, AttentionTap, attention_sites
from lightning_cka.taps.base import TapSet
from lightning_cka.taps.grams import REDUCTIONS, LayerGrams, Reduction, token_layout
from lightning_cka.taps.layers import LayerSpec, find_layers, named_modules
from lightning_cka.taps.unwrap import model_device, unwrap_model


class Recorder:
    """Record the ``(n, n)`` Gram matrix of every chosen layer's output while a model runs.

    Inside ``with Recorder(model, layers) as rec:`` every call of ``model`` is a probe pass: eval mode, no autograd,
    compiled modules run eagerly, and on exit every ``training`` flag and the global RNG states are restored and the
    hooks removed (also when the forward raises); see :func:`lightning_cka.probe_mode`. Each hook turns its layer's
    output into a Gram matrix on the spot and keeps only that, so memory is ``O(layers × n²)`` whatever the feature
    size, and an in-place op that later overwrites the output (``nn.ReLU(inplace=True)``) cannot change what was
    recorded. ``CKAMonitor`` and ``compare_models`` use the same hooks.

    A module that runs more than once in one forward pass (one ``nn.ReLU`` used twice) has no single output: the
    hook raises ``RuntimeError`` naming it; monitor its parent block or a module that runs once.

    Args:
        model: the model to probe; call it (not a submodule) inside the ``with`` block. DDP / DataParallel /
            ``torch.compile`` wrappers are looked through.
        layers: ``"auto"`` or names / glob patterns, see :func:`lightning_cka.find_layers`.
        reduction: what each layer's output becomes before its Gram (tuple outputs use their first tensor):
            ``"flatten"``: all features (tokens x channels, or C x H x W), as in the paper's code; ``"cls"``: the class
            token of ``(n, T, D)`` token outputs (an error for models without one); ``"mean"``: the mean over patch
            tokens (prefix tokens left out) of token outputs, or the spatial mean of 4-D maps (channels-last Swin maps
            too).
        attention: record the mean attention distance of timm ``Attention`` modules: ``"auto"`` when the model has
            them under a ``patch_embed`` geometry, ``True`` to require it, ``False`` to skip.
        renormalize_attention: renormalize attention over patch keys (see
            :func:`lightning_cka.functional.mean_attention_distance`).

    Attributes:
        layers: the monitored module names.
        attention_layers: names of the attention modules whose distances are recorded.
        attention: a :class:`MeanAttentionDistance` accumulating over the forward passes of the current ``with``
            block (cleared when a block starts; ``None`` without attention).

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
        self._grams = LayerGrams(self.layers, reduction, [token_layout(self._modules, n) for n in self.layers])
        taps = [self._grams]
        self._distances: _DistanceTap | None = None
        self.attention: MeanAttentionDistance | None = None
        sites = attention_sites(self._modules) if attention is not False else []
        sites = [
            s
            for s in sites
            if (s.grid, s.stride, s.num_prefix_tokens) == (sites[0].grid, sites[0].stride, sites[0].num_prefix_tokens)
        ]
        if attention is True and not sites:
            raise ValueError(
                f"attention=True, but {type(self.model).__name__} has no timm Attention module under a model with "
                "patch_embed.grid_size / patch_size (a timm ViT). Pass attention=False."
            )
        if sites:
            self._distances = _DistanceTap(sites, renormalize_attention)
            taps.append(self._distances)
        self.attention_layers = [site.name for site in sites]
        self._taps = TapSet(self.model, self._modules, taps)
        self._active = False

    def __enter__(self) -> "Recorder":
        if self._distances is not None:
            self._distances.reset(model_device(self.model))
            self.attention = self._distances.metric
        self._taps.__enter__()
        self._active = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._active = False
        self._taps.__exit__(*exc_info)

    @property
    def grams(self) -> list[Tensor]:
        """Gram matrices ``(n, n)`` of the latest forward pass, in the order of :attr:`layers`."""
        try:
            return self._grams.collect().grams
        except RuntimeError as err:
            raise RuntimeError(f"{err} (model: {type(self.model).__name__})") from None


class _DistanceTap(AttentionTap):
    """Feeds the attention probabilities of every site to one :class:`MeanAttentionDistance`."""

    def __init__(self, sites: list[AttentionSite], renormalize: bool) -> None:
        super().__init__(sites)
        self.renormalize = renormalize
        self.metric: MeanAttentionDistance | None = None

    def reset(self, device: object) -> None:
        site = self.sites[0]
        self.metric = MeanAttentionDistance(
            num_layers=len(self.sites),
            num_heads=max(s.num_heads for s in self.sites),
            grid_size=site.grid,
            patch_size=site.stride,
            num_prefix_tokens=site.num_prefix_tokens,
            renormalize=self.renormalize,
        ).to(device)

    @override
    def consume(self, layer: int, probs: Tensor, distances: Tensor) -> None:
        self.metric.update(probs, layer=layer)

    @override
    def collect(self) -> None:
        return None

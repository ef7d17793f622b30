"""Which analyses a probe runs, and how: the options ``CKAMonitor`` and ``compare_models`` share by name."""

from dataclasses import asdict, dataclass
from typing import Any, Literal

from lightning_cka.functional.estimate import WEIGHTINGS, Weighting

Switch = bool | Literal["auto"]


@dataclass(frozen=True)
class ProbeOptions:
    """The analysis options of a probe.

    Attributes:
        attention: mean attention distance and entropy per head of timm attention modules: ``"auto"`` where the model
            has them, ``True`` to require them, ``False`` to skip.
        heads: CKA of every attention head's output with every reference layer (needs a reference and attention).
        residual: ‖skip stream‖ / ‖branch‖ per token of every residual block whose branch can be located.
        localization: CKA between the tokens of ``localization_layer`` and the patch embedding at every pair of
            positions.
        localization_layer: the layer whose tokens are localized (default: the last monitored layer).
        linear_probe: closed-form ridge probes of the class at every layer (needs labels).
        rank: effective rank (RankMe) of every layer on each minibatch.
        permutations: permutations of the CKA null per minibatch (19: the 5% permutation test; 0: no null).
        minibatch_weights: ``"equal"`` or ``"size"`` weighting of minibatches in the CKA sums.
        renormalize_attention: renormalize attention over patch keys before distances (see
            :func:`lightning_cka.functional.mean_attention_distance`).
        seed: seed of the permutations.
    """

    attention: Switch = "auto"
    heads: Switch = "auto"
    residual: Switch = "auto"
    localization: bool = False
    localization_layer: str | None = None
    linear_probe: bool = False
    rank: bool = True
    permutations: int = 19
    minibatch_weights: Weighting = "equal"
    renormalize_attention: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("attention", "heads", "residual"):
            if getattr(self, name) not in (True, False, "auto"):
                raise ValueError(f"{name} must be True, False or 'auto', got {getattr(self, name)!r}.")
        for name in ("localization", "linear_probe", "rank", "renormalize_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if not isinstance(self.permutations, int) or not 0 <= self.permutations <= 1000:
            raise ValueError(
                "permutations must be an int in [0, 1000] (19 give the 5% permutation test), "
                f"got {self.permutations!r}."
            )
        if self.minibatch_weights not in WEIGHTINGS:
            raise ValueError(f"minibatch_weights must be one of {WEIGHTINGS}, got {self.minibatch_weights!r}.")
        if self.localization_layer is not None and not isinstance(self.localization_layer, str):
            raise ValueError(f"localization_layer must be a layer name, got {self.localization_layer!r}.")

    def as_dict(self) -> dict[str, Any]:
        """The options as JSON-ready builtins (stored with every probe)."""
        return asdict(self)

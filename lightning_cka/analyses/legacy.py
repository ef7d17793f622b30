"""The analyses of probe files written before they recorded their own (lightning-cka 0.1 and 0.2, formats 1 and 2).

Those files hold the fields of a fixed set of analyses, and format 2 stores the options they ran with in its
``settings``. This list is frozen: an analysis added later cannot be in those files.
"""

from typing import Any

from lightning_cka.analyses.attention import AttentionStats
from lightning_cka.analyses.heads import HeadCKA
from lightning_cka.analyses.layer_cka import LayerCKA
from lightning_cka.analyses.linear_probe import LinearProbe
from lightning_cka.analyses.localization import Localization
from lightning_cka.analyses.rank import EffectiveRank
from lightning_cka.analyses.residual import ResidualRatio
from lightning_cka.engine.analysis import Analysis


def legacy_analyses(settings: dict[str, Any]) -> list[Analysis]:
    """The analyses of a format 1 or 2 file, with the options its ``settings`` recorded (defaults where none).

    Example:
        >>> [a.name for a in legacy_analyses({})]
        ['cka', 'attention', 'heads', 'residual', 'localization', 'linear_probe', 'rank']
        >>> legacy_analyses({"options": {"permutations": 39}})[0].permutations
        39
    """
    options = settings.get("options") if isinstance(settings.get("options"), dict) else {}
    null = {key: options[key] for key in ("permutations", "minibatch_weights") if key in options}
    threshold = settings.get("local_threshold", 0.5)
    try:
        return [
            LayerCKA(**null),
            AttentionStats(bool(options.get("renormalize_attention", False)), threshold),
            HeadCKA(**null),
            ResidualRatio(),
            Localization(options.get("localization_layer"), **null),
            LinearProbe(),
            EffectiveRank(),
        ]
    except ValueError as err:
        raise ValueError(f"its settings hold options no analysis takes ({err})") from err

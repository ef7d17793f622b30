"""The analyses a probe runs, each a unit (see :class:`lightning_cka.engine.analysis.Analysis`).

Their order is the order of the fields in a probe file and of the figures in every view. Adding an analysis means
writing its class in a module of this package and listing it here (``docs/architecture.md``).
"""

from lightning_cka.analyses.attention import AttentionStats
from lightning_cka.analyses.heads import HeadCKA
from lightning_cka.analyses.layer_cka import LayerCKA
from lightning_cka.analyses.linear_probe import LinearProbe
from lightning_cka.analyses.localization import Localization
from lightning_cka.analyses.rank import EffectiveRank
from lightning_cka.analyses.residual import ResidualRatio
from lightning_cka.engine.analysis import Analysis
from lightning_cka.engine.options import ProbeOptions

ANALYSES: tuple[type[Analysis], ...] = (
    LayerCKA,
    AttentionStats,
    HeadCKA,
    ResidualRatio,
    Localization,
    LinearProbe,
    EffectiveRank,
)


def build_analyses(options: ProbeOptions) -> list[Analysis]:
    """One instance of every analysis, configured by ``options`` (each decides in ``bind`` whether it applies)."""
    return [analysis(options) for analysis in ANALYSES]


__all__ = [
    "ANALYSES",
    "AttentionStats",
    "EffectiveRank",
    "HeadCKA",
    "LayerCKA",
    "LinearProbe",
    "Localization",
    "ResidualRatio",
    "build_analyses",
]

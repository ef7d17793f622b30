"""The paper's Figure 1 as one picture: the model's CKA heatmap, the reference's beside it, and the two models crossed.

Raghu et al. 2021 open with this layout (a ViT's layers alike throughout, a ResNet's in stages, and which layers of the
two match); a thesis needs it as one print-ready figure. The three panels are the layer CKA analysis's own figures
(``cka/intra``, ``cka/reference_intra``, ``cka/reference``) of one probe, drawn side by side.
"""

from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure as MplFigure

from lightning_cka.figures.render import WIDTH, draw_figure, figure_height
from lightning_cka.figures.spec import Figure

if TYPE_CHECKING:
    from lightning_cka.engine.analysis import View
    from lightning_cka.result import CKAResult

TAGS = ("cka/intra", "cka/reference_intra", "cka/reference")


def figure_one_specs(result: "CKAResult", view: "View") -> list[Figure]:
    """The three figures of the layout, left to right, from one probe; fewer when the probe has no reference."""
    analysis = result.analysis("cka")
    if analysis is None:
        return []
    drawn = {f.tag: f for f in analysis.figures(result, None, view)}  # previous=None: the reference's own heatmap too
    return [drawn[tag] for tag in TAGS if tag in drawn]


def draw_figure_one(result: "CKAResult", view: "View") -> Any:
    """The composite as a matplotlib figure (save it as PDF or SVG for print).

    Raises:
        ValueError: the probe has no reference (or no layer CKA), so there is no second model to set beside.
    """
    specs = figure_one_specs(result, view)
    if len(specs) < len(TAGS):
        raise ValueError(
            "the paper's Figure 1 needs a probe with a reference model (CKAMonitor(reference=...)): this one has "
            f"{', '.join(f.tag for f in specs) or 'no CKA heatmap'}."
        )
    fig = MplFigure(figsize=(WIDTH * len(specs), max(figure_height(f) for f in specs)), layout="constrained", dpi=100)
    for sub, spec in zip(fig.subfigures(1, len(specs)), specs, strict=True):
        draw_figure(spec, sub)
    return fig

"""``lightning-cka report``: what runs show of the paper's findings, written for a reader (HTML and Markdown).

Example:
    >>> from lightning_cka.report import build_report, write_report
    >>> # report = build_report([Side("ViT", [RunProbes("vit/version_0", probes)])])
    >>> # write_report(report, "report.html")  # also report.md and report_files/
"""

from pathlib import Path

from lightning_cka.report.build import Report, build_report
from lightning_cka.report.document import Pictures, layout
from lightning_cka.report.write import write_html, write_markdown

__all__ = ["Report", "build_report", "write_report"]


def write_report(report: Report, path: str | Path, markdown: bool = True, dpi: int = 110) -> list[Path]:
    """Write ``report`` as HTML at ``path`` (and as Markdown beside it, ``<stem>.md`` with ``<stem>_files/``).

    Returns:
        The files written (the HTML first).
    """
    path = Path(path)
    blocks = layout(report, Pictures(dpi=dpi))
    written = [write_html(blocks, path, report.title)]
    if markdown:
        written.append(write_markdown(blocks, path.with_suffix(".md")))
    return written

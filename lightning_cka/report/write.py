"""Write a report as one self-contained HTML file (pictures inside) and as Markdown with its pictures beside it.

Both files are written to a temporary name and renamed, so an interrupted write never leaves a half report.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from pathlib import Path

from lightning_cka.findings import CANNOT_TELL, DOES_NOT, NOT_MEASURED, PARTLY, SHOWS
from lightning_cka.report.document import Block, Heading, Items, Picture, Table, Text, Verdict

COLOURS = {SHOWS: "#1a7f37", PARTLY: "#9a6700", DOES_NOT: "#b42318", CANNOT_TELL: "#57606a", NOT_MEASURED: "#8c959f"}
STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1f2328; }
h1 { font-size: 1.7em; } h2 { margin-top: 2em; border-bottom: 1px solid #d0d7de; } h3 { margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
td, th { border: 1px solid #d0d7de; padding: .25em .55em; vertical-align: top; text-align: left; }
th { background: #f6f8fa; }
.verdict { display: inline-block; color: #fff; border-radius: 4px; padding: .05em .5em; font-weight: 600;
           white-space: nowrap; }
.paper { color: #57606a; font-style: italic; } .needs { border-left: 3px solid #9a6700; padding-left: .6em; }
.note { color: #57606a; font-size: .92em; }
img { max-width: 100%; height: auto; display: block; margin: .6em 0; }
@media print { h2, h3 { break-after: avoid; } img, table { break-inside: avoid; } }
"""


def write_html(blocks: list[Block], path: str | os.PathLike, title: str) -> Path:
    """The report as one HTML file that opens offline: styles and pictures (base64 PNG) inside."""
    body = "\n".join(_html(block) for block in blocks)
    text = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<style>{STYLE}</style>\n</head>\n'
        f"<body>\n{body}\n</body>\n</html>\n"
    )
    return _atomic(Path(path), text.encode())


def write_markdown(blocks: list[Block], path: str | os.PathLike) -> Path:
    """The report as Markdown, its pictures as PNG files in ``<stem>_files/`` beside it."""
    path = Path(path)
    folder = path.with_name(f"{path.stem}_files")
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for block in blocks:
        if isinstance(block, Picture) and block.first:
            _atomic(folder / f"{block.name}.png", block.png)
        lines.append(_markdown(block, folder.name))
    return _atomic(path, ("\n\n".join(line for line in lines if line) + "\n").encode())


def _html(block: Block) -> str:
    if isinstance(block, Heading):
        anchor = "".join(c if c.isalnum() else "-" for c in block.text.lower()).strip("-")[:60]
        return f'<h{block.level} id="{anchor}">{html.escape(block.text)}</h{block.level}>'
    if isinstance(block, Text):
        return f'<p class="{block.kind}">{html.escape(block.text)}</p>'
    if isinstance(block, Verdict):
        return f"<p>{_badge(block.verdict)} {html.escape(block.reason)}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
        rows = "".join(
            "<tr>"
            + "".join(
                f"<td>{_badge(cell) if i == block.verdict_column else html.escape(cell)}</td>"
                for i, cell in enumerate(row)
            )
            + "</tr>"
            for row in block.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if isinstance(block, Items):
        return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block.items) + "</ul>"
    data = base64.b64encode(block.png).decode()
    return f'<img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">'


def _badge(verdict: str) -> str:
    colour = COLOURS.get(verdict, "#57606a")
    return f'<span class="verdict" style="background:{colour}">{html.escape(verdict)}</span>'


def _markdown(block: Block, folder: str) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Text):
        return f"*{_escape(block.text)}*" if block.kind in ("paper", "note") else _escape(block.text)
    if isinstance(block, Verdict):
        return f"**{block.verdict}**: {_escape(block.reason)}"
    if isinstance(block, Table):
        rows = [block.header, ["---"] * len(block.header), *block.rows]
        return "\n".join("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows)
    if isinstance(block, Items):
        return "\n".join(f"- {_escape(item)}" for item in block.items)
    return f"![{block.alt}]({folder}/{block.name}.png)"


def _escape(text: str) -> str:
    return text.replace("*", "\\*").replace("_", "\\_")


def _cell(text: str) -> str:
    return _escape(text).replace("|", "\\|").replace("\n", " ")


def _atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path

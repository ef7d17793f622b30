"""Write the tables of docs/report.md (every finding's criteria) from what the analyses declare.

    python docs/make_report_doc.py

Each analysis declares the criteria of its verdicts and events beside its fields (``Analysis.criteria``); this keeps
the page in step with the code (a test checks that every criterion is listed with its default).
"""

from pathlib import Path

from lightning_cka.analyses import builtin_analyses

PAGE = Path(__file__).parent / "report.md"
BEGIN, END = "<!-- criteria: begin (docs/make_report_doc.py) -->", "<!-- criteria: end -->"


def table() -> str:
    """The Markdown table: one row per criterion, by analysis."""
    rows = ["| criterion | default | what it decides |", "| --- | --- | --- |"]
    for analysis in builtin_analyses():
        for criterion in analysis.criteria:
            doc = criterion.doc.replace("|", "\\|")
            rows.append(f"| `{analysis.name}.{criterion.key}` | {criterion.default:g} | {doc} |")
    return "\n".join(rows)


def main() -> None:
    """Replace the table between the markers of docs/report.md."""
    text = PAGE.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    PAGE.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")
    print(f"wrote the criteria of {PAGE}")


if __name__ == "__main__":
    main()

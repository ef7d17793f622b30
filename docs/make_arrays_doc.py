"""Write the table of docs/tags/arrays.md from the fields the probe and every analysis declare.

    python docs/make_arrays_doc.py

The fields are declared where they are computed (``lightning_cka.result.PROBE_FIELDS`` and each analysis's
``fields``); this keeps their documentation in step with the code (a test checks that every field is listed).
"""

from pathlib import Path

from lightning_cka.analyses import builtin_analyses
from lightning_cka.result import PROBE_FIELDS

PAGE = Path(__file__).parent / "tags" / "arrays.md"
BEGIN, END = "<!-- fields: begin (docs/make_arrays_doc.py) -->", "<!-- fields: end -->"
KINDS = {
    "array": "float64 array",
    "names": "str array",
    "float": "float",
    "int": "int",
    "ints": "int64 array",
    "text": "str",
}


def table() -> str:
    """The Markdown table: one row per field, grouped by where it comes from."""
    rows = ["| key | type | content | from |", "| --- | --- | --- | --- |"]
    groups = [("the probe", PROBE_FIELDS), *((f"`{a.__name__}` ({a.name})", a.fields) for a in builtin_analyses())]
    for source, fields in groups:
        for field in fields:
            key = f"`{field.key}`" + (f", `reference_{field.key}`" if field.per_model else "")
            doc = field.doc.replace("|", "\\|")  # a pipe would end the cell
            rows.append(f"| {key} | {KINDS[field.kind]} | {doc} | {source} |")
    return "\n".join(rows)


def main() -> None:
    """Replace the table between the markers of docs/tags/arrays.md."""
    text = PAGE.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    PAGE.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")
    print(f"wrote the table of {PAGE}")


if __name__ == "__main__":
    main()

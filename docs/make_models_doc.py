"""Write the table of docs/models.md from what the families test finds on every model family it tries.

    python docs/make_models_doc.py

The families and their fit come from tests/family_zoo.py, the module the test uses, and tests/test_families_zoo.py
checks that the page holds this table: the page cannot drift from what the test finds.
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from family_zoo import FAMILIES, fit, models_table

from lightning_cka import CKAResult

PAGE = Path(__file__).parent / "models.md"
BEGIN, END = "<!-- families: begin (docs/make_models_doc.py) -->", "<!-- families: end -->"


def main() -> None:
    """Fit every family once and replace the table between the markers of docs/models.md."""
    torch.set_num_threads(1)
    outcomes = {}
    with tempfile.TemporaryDirectory() as root:
        for family in FAMILIES:
            trainer, _, _ = fit(family, root)
            result = CKAResult.load(f"{trainer.log_dir}/cka/step_0000001.npz")
            outcomes[f"{family.library}-{family.name}"] = (
                [a.name for a in result.analyses],
                result.settings_dict()["left_out"],
            )
            print(f"{family.library} {family.name}: {', '.join(outcomes[f'{family.library}-{family.name}'][0])}")
    text = PAGE.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    PAGE.write_text(f"{head}{BEGIN}\n{models_table(outcomes)}\n{END}{tail}")
    print(f"wrote the table of {PAGE}")


if __name__ == "__main__":
    main()

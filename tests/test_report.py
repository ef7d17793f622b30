"""``lightning-cka report``: the document a student hands in, from runs on disk, checked against what was planted.

The runs are real probes of small timm ViTs against a ResNet (``compare_models``), saved as probe files over several
steps; side B's layer CKA is lowered by a planted amount in every run, so the group report must find that difference
and no other in the CKA headline, and a one-run-per-side report must refuse to test anything.
"""

import json
import re

import numpy as np
import pytest

from lightning_cka.cli import main
from lightning_cka.result import CKAResult

STEPS = (0, 10, 20)
PLANTED = 0.1  # lower off-diagonal CKA in every run of side B


def probe(seed):
    import timm
    import torch

    from lightning_cka import compare_models

    torch.manual_seed(seed)
    vit = timm.create_model("test_vit", num_classes=4, img_size=32, patch_size=8).eval()
    resnet = timm.create_model("test_resnet", num_classes=4).eval()
    generator = torch.Generator().manual_seed(100)
    images, labels = torch.randn(64, 3, 32, 32, generator=generator), torch.randint(0, 4, (64,), generator=generator)
    data = torch.utils.data.TensorDataset(images, labels)
    return compare_models(vit, resnet, data=data, batch_size=8, analyses=["default", "linear_probe"], label_b="resnet")


def save_run(folder, result, shift, seed):
    """``result`` at every step, its CKA jittered (the seed's own noise) and lowered by ``shift`` off the diagonal."""
    rng = np.random.default_rng(seed)
    off = ~np.eye(len(result.layers), dtype=bool)
    for step in STEPS:
        fields = {key: result.get(key) for key in result}
        jitter = 0.01 * rng.standard_normal(off.shape)
        jitter = (jitter + jitter.T) / 2
        fields["intra"] = np.where(off, result.intra - shift + jitter, 1.0)
        fields["intra_replicates"] = result.intra_replicates - shift * off + jitter * off
        fields["step"], fields["run"] = step, folder.name
        CKAResult(fields, analyses=result.analyses).save(folder / "cka" / f"step_{step:07d}.npz")
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    measured = [probe(seed) for seed in range(2)]
    a = [save_run(root / f"large-seed{i}", measured[i % 2], 0.0, i) for i in range(3)]
    b = [save_run(root / f"small-seed{i}", measured[(i + 1) % 2], PLANTED, 10 + i) for i in range(3)]
    return root, a, b


def test_a_group_report_finds_the_planted_difference_and_writes_both_documents(runs):
    root, a, b = runs
    out = root / "groups" / "report.html"
    argv = ["report", *map(str, a), "--vs", *map(str, b), "--labels", "100 %", "5 %", "--out", str(out)]
    assert main(argv) == 0
    page = out.read_text()
    assert not re.search(r'src="(?!data:)', page) and "<link" not in page and "http" not in page.split("<body>")[1]
    for title in (
        "Layers alike throughout, or in stages",
        "Which layers of the two models match",
        "Local and global heads",
        "Local heads and the amount of training data",
        "The class becomes decodable with depth",
    ):
        assert title in page
    rows = {cells[0]: cells for cells in _table_rows(page, "what differs")}
    assert rows["cka/offdiag_mean"][-1] == "differs"
    expected = np.mean(
        [CKAResult.load(f / "cka" / "step_0000020.npz").scalars()["cka/offdiag_mean"] for f in a]
    ) - np.mean([CKAResult.load(f / "cka" / "step_0000020.npz").scalars()["cka/offdiag_mean"] for f in b])
    assert rows["cka/offdiag_mean"][3].startswith(f"{expected:+.3f}")
    assert rows["rank/mean"][-1] == "no difference found"
    markdown = out.with_suffix(".md").read_text()
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert pictures and all((out.parent / p).is_file() for p in pictures)
    assert page.count("<img") == len(pictures)


def test_one_run_per_side_tests_nothing_and_says_why(runs):
    root, a, b = runs
    out = root / "single" / "report.html"
    assert main(["report", str(a[0]), "--vs", str(b[0]), "--out", str(out), "--no-markdown"]) == 0
    page = out.read_text()
    assert "one run per side: seed variation unknown" in page and ">differs<" not in page
    assert not out.with_suffix(".md").exists()


def test_criteria_from_the_command_line_and_a_file_are_in_force_and_unknown_ones_are_refused(runs, tmp_path, capsys):
    _, a, _ = runs
    criteria = tmp_path / "criteria.json"
    criteria.write_text(json.dumps({"rank.collapsed": 1000}))
    out = tmp_path / "report.html"
    assert main(["report", str(a[0]), "--criteria", "cka.far_alike=0.9999", str(criteria), "--out", str(out)]) == 0
    rows = {cells[0]: cells for cells in _table_rows(out.read_text(), "appendix: the criteria")}
    assert rows["cka.far_alike"][1:3] == ["0.9999", "0.5"] and rows["rank.collapsed"][1] == "1000"
    assert "lowest effective rank of a layer" in out.read_text() and "is not above 1000" in out.read_text()
    assert main(["report", str(a[0]), "--criteria", "cka.nope=1", "--out", str(out)]) == 2
    assert "no criterion 'cka.nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "report.pdf"], "--out is the HTML file"),
        (["--labels", "a", "b"], "give 1 label"),
        (["--criteria", "cka.far_alike=high"], "must be a number"),
        (["--dpi", "5"], "--dpi must be between"),
    ],
)
def test_bad_arguments_are_one_line_errors(runs, extra, message, capsys):
    _, a, _ = runs
    assert main(["report", str(a[0]), *extra]) == 2
    assert message in capsys.readouterr().err


def test_the_reference_run_gets_a_section_of_its_own(runs, tmp_path):
    _, a, b = runs
    out = tmp_path / "report.html"
    assert main(["report", str(a[0]), "--reference-run", str(b[1]), "--out", str(out), "--no-markdown"]) == 0
    page = out.read_text()
    assert "The reference model&#x27;s own run" in page and "small-seed1" in page
    assert "does not name the reference run" in page  # this run's reference is an untrained module, not that run


def _table_rows(page, after):
    """The rows (cell texts) of the first table after the heading containing ``after``."""
    start = page.lower().index(after.lower())
    table = page[start:].split("<table>", 1)[1].split("</table>", 1)[0]
    body = table.split("<tbody>", 1)[1]
    return [
        [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td>(.*?)</td>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", body)
    ]

"""The docs keep up with the code: every stored field, every figure tag and every relative link is documented."""

import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import TensorDataset

from lightning_cka import compare_models
from lightning_cka.analyses import builtin_analyses
from lightning_cka.result import PROBE_FIELDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TAG_PAGES = DOCS / "tags"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _field_keys() -> list[str]:
    keys = []
    for field in [*PROBE_FIELDS, *(f for analysis in builtin_analyses() for f in analysis.fields)]:
        keys.append(field.key)
        if field.per_model:
            keys.append(f"reference_{field.key}")
    return keys


@pytest.mark.parametrize("key", _field_keys())
def test_every_stored_field_is_in_the_arrays_page(key: str) -> None:
    assert f"`{key}`" in (TAG_PAGES / "arrays.md").read_text(), (
        f"{key} is not in docs/tags/arrays.md: run python docs/make_arrays_doc.py"
    )


@pytest.fixture(scope="module")
def figure_tags() -> list[str]:
    """Every figure a probe with every analysis on draws, for a ViT against a ResNet."""
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=10).eval()
    resnet = timm.create_model("test_resnet", num_classes=10).eval()
    data = TensorDataset(torch.randn(48, 3, 160, 160), torch.from_numpy(np.random.default_rng(0).permutation(48) % 10))
    result = compare_models(vit, resnet, data=data, batch_size=16, analyses=["default", "localization", "linear_probe"])
    return [figure.tag for figure in result.figures()]


def test_every_figure_tag_has_a_page(figure_tags: list[str]) -> None:
    assert len(figure_tags) >= 8, figure_tags  # the probe really drew the analyses' figures
    pages = {path.name: path.read_text() for path in TAG_PAGES.glob("*.md")}
    for tag in figure_tags:
        own = tag.replace("/", "-").replace("_", "-") + ".md"
        # A reference variant (cka/reference_intra, residual/reference_norm_ratio) is explained on its base page.
        assert own in pages or any(f"`{tag}`" in text for text in pages.values()), f"no docs/tags page names {tag}"


@pytest.mark.parametrize(
    "page", sorted([ROOT / "README.md", *DOCS.rglob("*.md")]), ids=lambda p: str(p.relative_to(ROOT))
)
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


@pytest.mark.parametrize(
    "name, default",
    [(f"{a.name}.{c.key}", c.default) for a in builtin_analyses() for c in a.criteria],
)
def test_every_criterion_is_in_the_report_page_with_its_default(name: str, default: float) -> None:
    assert f"| `{name}` | {default:g} |" in (DOCS / "report.md").read_text(), (
        f"{name} is not in docs/report.md with its default: run python docs/make_report_doc.py"
    )

"""The dashboard's frontend file itself: valid JavaScript, and self-contained (nothing fetched from elsewhere)."""

import re
import shutil
import subprocess
from importlib import resources

import pytest

INDEX_JS = resources.files("lightning_cka.dashboard").joinpath("static", "index.js")


@pytest.mark.skipif(shutil.which("node") is None, reason="no node: the syntax check needs Node.js")
def test_index_js_parses():
    subprocess.run(["node", "--check", str(INDEX_JS)], check=True, capture_output=True, timeout=30)


def test_index_js_loads_nothing_from_elsewhere():
    source = INDEX_JS.read_text()
    assert "export async function render()" in source  # what TensorBoard's plugin entry page calls
    assert not re.search(r"^\s*import\b|\bimport\(", source, re.MULTILINE)
    urls = set(re.findall(r"https?://[^\s\"'`]+", source))
    assert urls == {"http://www.w3.org/2000/svg"}  # a namespace name, never fetched

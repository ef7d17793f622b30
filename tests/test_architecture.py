"""The package's layers: no import cycle, no module importing a higher layer, and reading results without torch.

Every import counts (module level and inside functions) except those under ``if TYPE_CHECKING:``. Run it alone with
``pytest tests/test_architecture.py``; docs/architecture.md shows the same table.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_cka"

# Lower numbers are lower layers; a module may import its own layer (within one subpackage) or lower ones.
LAYERS = {
    "lightning_cka.__about__": 0,
    "lightning_cka.stats": 0,
    "lightning_cka.figures.spec": 0,
    "lightning_cka.engine.options": 0,
    "lightning_cka.figures": 1,
    "lightning_cka.engine.analysis": 1,
    "lightning_cka.findings": 1,
    "lightning_cka.probe_file": 2,
    "lightning_cka.result": 3,
    "lightning_cka.functional": 2,
    "lightning_cka.metrics": 3,
    "lightning_cka.taps": 4,
    "lightning_cka.models": 4,
    "lightning_cka.engine.models": 5,
    "lightning_cka.engine.engine": 6,
    "lightning_cka.probe_data": 5,
    "lightning_cka.reference": 5,
    "lightning_cka.analyses": 7,
    "lightning_cka.compare": 8,
    "lightning_cka.dashboard": 9,
    "lightning_cka.report": 9,
    "lightning_cka.callbacks": 10,
    "lightning_cka.cli": 11,
    "lightning_cka": 12,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> tuple[str, int]:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return best, LAYERS[best]


def imports(path: Path) -> set[str]:
    """The lightning_cka modules ``path`` imports, outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rsplit(".", 1)[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("lightning_cka"))
        elif isinstance(node, ast.ImportFrom) and (node.module or node.level):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            if base.startswith("lightning_cka"):
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    where = PACKAGE.parent / candidate.replace(".", "/")
                    found.add(candidate if where.is_dir() or where.with_suffix(".py").is_file() else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name != own}


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}


def test_no_module_imports_a_higher_layer():
    wrong = []
    for module, targets in graph().items():
        group, rank = layer(module)
        for target in targets:
            target_group, target_rank = layer(target)
            if target_rank > rank or (target_rank == rank and target_group != group):
                wrong.append(f"{module} ({group}, {rank}) imports {target} ({target_group}, {target_rank})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target in edges and not state.get(target):
                walk(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if not state.get(node):
            walk(node, [node])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("module", sorted(name for name in LAYERS if name != "lightning_cka"))
def test_every_layer_in_the_table_exists(module):
    assert any(name == module or name.startswith(module + ".") for name in graph())

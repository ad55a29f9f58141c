"""docs/architecture.md's module table is the import rule: every module of hindsight_py is in it,
its imports are the ones listed, and they point down the table (to modules listed before it),
never to another module's private names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hindsight_py"
DOC = ROOT / "docs" / "architecture.md"


def declared() -> dict[str, set[str]]:
    """The module table, in order (bottom layer first): module -> the imports listed."""
    text = DOC.read_text()
    table = text[text.index("| module | concept | imports |"):].split("\n\n")[0]
    rows: dict[str, set[str]] = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        module = cells[0].strip("`")
        rows[module] = set(re.findall(r"`([^`]+)`", cells[-1]))
    return rows


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return "/".join(parts)


def _is_module(name: str) -> bool:
    return ((PACKAGE / f"{name}.py").exists() or (PACKAGE / name / "__init__.py").exists()
            or (PACKAGE / f"{name}.c").exists())


def actual() -> dict[str, dict[str, set[str]]]:
    """Every module of hindsight_py -> {imported module: the names taken from it}."""
    out: dict[str, dict[str, set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name.split("/") if path.name == "__init__.py" and "/" not in name and name != "__init__" \
            else name.split("/")[:-1]
        deps: dict[str, set[str]] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("hindsight_py."):
                        deps.setdefault(alias.name[len("hindsight_py."):].replace(".", "/"), set())
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                    target = "/".join(base + (node.module.split(".") if node.module else []))
                elif node.module and (node.module == "hindsight_py" or node.module.startswith("hindsight_py.")):
                    target = node.module[len("hindsight_py"):].lstrip(".").replace(".", "/")
                else:
                    continue
                for alias in node.names:
                    sub = f"{target}/{alias.name}".strip("/")
                    if _is_module(sub):
                        deps.setdefault(sub, set())
                    else:
                        deps.setdefault(target, set()).add(alias.name)
        out[name] = deps
    return out


TABLE = declared()
IMPORTS = actual()


def test_every_module_is_in_the_table() -> None:
    assert sorted(set(IMPORTS) - set(TABLE)) == []
    assert sorted(m for m in TABLE if not _is_module(m) and m != "__init__") == []


@pytest.mark.parametrize("module", sorted(IMPORTS))
def test_imports_are_the_listed_ones_and_point_down(module: str) -> None:
    order = list(TABLE)
    deps = IMPORTS[module]
    assert set(deps) == TABLE.get(module), f"{module}: the imports column of docs/architecture.md is wrong"
    up = [d for d in deps if order.index(d) >= order.index(module)]
    assert up == [], f"{module} imports {up}, listed at or after it in docs/architecture.md"
    private = sorted(f"{d}.{n}" for d, names in deps.items() for n in names if n.startswith("_"))
    assert private == [], f"{module} imports private names of other modules"

"""The package layout stays as docs/DESIGN.md describes it: families are packages, imports point one way."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_fastif"
# functional <- retrieval <- solvers <- influence <- trainer/evaluation/applications <- reporting <- cli;
# the top-level modules (errors, results, _runtime, _files, _version, threads) and zoo sit below all of them.
RANK = {"functional": 0, "retrieval": 1, "solvers": 2, "influence": 3, "trainer": 4, "evaluation": 4,
        "applications": 4, "reporting": 5, "cli": 6}  # fmt: skip


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, top_level_only: bool) -> list[tuple[str, list[str]]]:
    tree = ast.parse(path.read_text())
    nodes: list[ast.AST] = []
    if top_level_only:
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            nodes.append(node)
            if isinstance(node, ast.Try):
                nodes.extend(node.body)
    else:
        nodes = list(ast.walk(tree))
    found = []
    for node in nodes:
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] == "lightning_fastif"
        ):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name.split(".")[0] == "lightning_fastif")
    return found


def _rank(module: str) -> int:
    parts = module.split(".")
    return RANK.get(parts[1], -1) if len(parts) > 1 else 99


def test_top_level_has_at_most_ten_modules() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top


def test_no_family_of_prefixed_siblings_is_left_outside_a_package() -> None:
    for folder in [PACKAGE, *[p for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__"]]:
        families = defaultdict(list)
        for path in folder.glob("*.py"):
            stem = path.stem.lstrip("_")
            if "_" in stem and path.stem != "__init__":
                families[stem.split("_")[0]].append(path.name)
        big = {prefix: names for prefix, names in families.items() if len(names) >= 3}
        assert not big, f"{folder}: make a package of {big}"


def test_package_faces_re_export_no_private_name() -> None:
    for path in PACKAGE.rglob("__init__.py"):
        for module, names in _imports(path, top_level_only=False):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{path} re-exports private names {private} from {module}"


def test_imports_point_down_the_layers() -> None:
    upward = []
    for module, path in _modules().items():
        if module == "lightning_fastif":
            continue
        for target, _ in _imports(path, top_level_only=False):
            if target == "lightning_fastif" and _rank(module) == RANK["cli"]:
                continue  # the command line may use the public face, like any user
            same_layer = target.split(".")[:2] == module.split(".")[:2]
            if not same_layer and _rank(target) > _rank(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a lower layer up:\n" + "\n".join(upward)


def test_no_import_cycle_at_module_level() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names in _imports(path, top_level_only=True):
            for name in names or [""]:
                full = f"{target}.{name}" if name and f"{target}.{name}" in modules else target
                if full in modules and full != module:
                    graph[module].add(full)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_design_document_names_every_package() -> None:
    design = (PACKAGE.parent / "docs" / "DESIGN.md").read_text()
    packages = sorted(p.parent.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("__init__.py"))
    missing = [
        p for p in packages if p != "." and not re.search(rf"\b{re.escape(p.split('/')[-1])}/", design)
    ]
    assert not missing, f"docs/DESIGN.md does not place {missing}"

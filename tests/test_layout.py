"""The package layout shows the pipeline: no import cycles, and no stage imports a later one.

The import graph is read from the source (``ast``): every ``import``/``from ... import`` of a ctquant
module, at module level and inside functions, and the lazy API table of ``ctquant/__init__.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ctquant

PACKAGE = Path(ctquant.__file__).resolve().parent

#: The stages in the order data flows (the same list is in ctquant/__init__.py). A module may import
#: modules of its own stage and of earlier ones only.
LAYERS = [
    ("ctquant.errors", "ctquant.version"),
    ("ctquant.config",),
    ("ctquant.io",),
    ("ctquant.segment",),
    ("ctquant.measures",),
    ("ctquant.outputs",),
    ("ctquant.run",),
    ("ctquant.trial",),
    ("ctquant.synthetic",),
    ("ctquant",),  # the Python API (ctquant/__init__.py)
    ("ctquant.cli",),
]


def module_name(path: Path) -> str:
    parts = ("ctquant",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """ctquant modules that ``name`` imports anywhere in its source (``from . import x`` counts as x)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ctquant.io.scans.load_scan -> ctquant.io.scans
                target = target.rpartition(".")[0]
            if target and target.startswith("ctquant") and target != name:
                found.add(target)
    if name == "ctquant":
        found |= set(ctquant._API.values())  # the API's lazy imports
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: imported(name, path, known) for name, path in modules.items()}


def layer_of(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "ctquant" and module.startswith(prefix + ".")):
                best = index
    if best is None:
        raise AssertionError(f"{module} is in no stage of LAYERS: add it there")
    return best


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} imports {b}" for a, targets in graph.items() for b in targets
                  if layer_of(b) > layer_of(a) and not (a.startswith(b + ".") and b != "ctquant"))


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_violations({"ctquant.segment.lungs": {"ctquant.run.scan"}}) == [
        "ctquant.segment.lungs imports ctquant.run.scan"]
    assert layer_violations({"ctquant.run.scan": {"ctquant.segment.lungs", "ctquant.config"}}) == []


def test_the_graph_sees_module_and_function_level_imports():
    graph = import_graph()
    assert "ctquant.segment.grid" in graph["ctquant.segment.lungs"]  # module level, relative
    assert "ctquant.segment.lesion_model" in graph["ctquant.run.scan"]  # inside a function
    assert "ctquant.run.scan" in graph["ctquant"]  # the lazy API
    assert "ctquant.run.batch" in graph["ctquant.trial.endpoints"]


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_no_stage_imports_a_later_one():
    assert layer_violations(import_graph()) == []


def test_every_stage_folder_says_what_comes_in_and_goes_out():
    for folder in sorted(p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc and "In:" in doc and "Out:" in doc, folder.name


def test_one_of_each_helper():
    sources = {name: path.read_text() for name, path in all_modules().items()}
    for definition, home in [("def dice_score(", "ctquant.measures.overlap"),
                             ("def resolve_device(", "ctquant.config"),
                             ("def atomic_output_dir(", "ctquant.outputs.atomic"),
                             ("def atomic_write_text(", "ctquant.outputs.atomic"),
                             ("def block_mean(", "ctquant.segment.grid"),
                             ("def upsample_blocks(", "ctquant.segment.grid")]:
        assert [name for name, text in sources.items() if definition in text] == [home], definition
    renames = [name for name, text in sources.items() if "os.replace(" in text]
    assert renames == ["ctquant.outputs.atomic"], renames  # every atomic rename goes through one module


@pytest.mark.parametrize("name", sorted(ctquant._API))
def test_api_names_resolve(name):
    assert getattr(ctquant, name) is getattr(__import__(ctquant._API[name], fromlist=[name]), name)

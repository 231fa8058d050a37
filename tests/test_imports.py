"""What a module may know of others.

The packages' import graph has no cycles: a module can be read (and changed) knowing only what
it imports. Counted: module-level and function-level imports, and `importlib.import_module` calls
(a registry package importing each of its modules); not: `if TYPE_CHECKING:` blocks.

Stages and methods are known by their registry entries only: no code outside a stage's recipe
names a stage (trainers/recipes/), and none outside the method registry (trainers/methods/)
branches on a method's name.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainers", "orchestrator")


def _modules(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    modules = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def _dynamic_imports(name: str, path: Path, node: ast.Call, modules: dict[str, Path]) -> set[str]:
    """The modules an `importlib.import_module(...)` call can import: a literal name, or every
    module of this package for `f"{__name__}.{...}"` (a registry importing its own modules)."""
    arg = node.args[0] if node.args else None
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return {arg.value}
    if (isinstance(arg, ast.JoinedStr) and path.name == "__init__.py" and isinstance(arg.values[0], ast.FormattedValue)
            and ast.unparse(arg.values[0].value) == "__name__"):
        return {m for m in modules if m.rpartition(".")[0] == name}
    raise AssertionError(f"{path}:{node.lineno}: an import_module argument this check cannot follow")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (`from pkg import name` counts as pkg.name when that is
    a module, else as pkg)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}

    def nearest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {nearest(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else nearest(node.module))
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module"):
            found |= {nearest(module) for module in _dynamic_imports(name, path, node, modules)}
    return found - {None}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def _graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    modules = _modules(root, packages)
    return {name: _imports(name, path, modules) - {name} for name, path in modules.items()}


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_check_follows_a_registry_through_import_module(tmp_path):
    """A registry package importing its modules by importlib, one of which imports a module that
    imports the registry back: the cycle the method registry and the memory estimator once had."""
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "__init__.py").write_text(
        "import importlib\nimport pkgutil\n\nfor m in pkgutil.iter_modules(__path__):\n"
        "    importlib.import_module(f\"{__name__}.{m.name}\")\n")
    (tmp_path / "reg" / "entry.py").write_text("def size():\n    from user.helpers import count\n")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "__init__.py").write_text("")
    (tmp_path / "user" / "helpers.py").write_text("def count():\n    from reg import ENTRIES\n")
    graph = _graph(tmp_path, ("reg", "user"))
    assert _cycles(graph) == [["reg", "reg.entry", "user.helpers"]]


# --------------------------------------------------------------------------- names known by registries only

NAMED_OUTSIDE = ("tests", "conf", "sweeps")  # where any stage or method may be named


def _code_files(home: str):
    """The repository's Python files outside tests/, conf/, sweeps/ and the registry `home`."""
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] in NAMED_OUTSIDE or parts[0].startswith(".") or "/".join(parts).startswith(home + "/"):
            continue
        yield path


def _docstrings(tree: ast.AST) -> set[int]:
    bodies = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                           ast.AsyncFunctionDef))]
    return {id(b.body[0].value) for b in bodies if b.body and isinstance(b.body[0], ast.Expr)
            and isinstance(b.body[0].value, ast.Constant)}


def stage_names_in(source: str, names) -> list[tuple[int, str]]:
    """(line, text) of each string that is a stage's name or a message naming one (`stage NAME`,
    `NAME stage`); docstrings are documentation and not counted."""
    alternatives = "|".join(re.escape(n) for n in names)
    message = re.compile(rf"\bstages? ({alternatives})\b|\b({alternatives}) stages?\b")
    tree = ast.parse(source)
    docs = _docstrings(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
            and (node.value in names or message.search(node.value))]


def method_branches_in(source: str, names) -> list[tuple[int, str]]:
    """(line, code) of each comparison with a method's name (`x == "full"`, `x in ("lora", ...)`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            values = [c for o in operands for c in ([o] if isinstance(o, ast.Constant) else getattr(o, "elts", []))]
            if any(isinstance(c, ast.Constant) and c.value in names for c in values):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_stage_is_named_outside_its_recipe():
    from trainers.recipes import RECIPES

    found = [f"{path.relative_to(ROOT)}:{line}: {text!r}" for path in _code_files("trainers/recipes")
             for line, text in stage_names_in(path.read_text(), set(RECIPES))]
    assert not found, "ask the stage's RecipeSpec instead of naming the stage:\n" + "\n".join(found)


def test_no_method_name_is_branched_on_outside_the_registry():
    from trainers.methods import METHODS

    found = [f"{path.relative_to(ROOT)}:{line}: {code}" for path in _code_files("trainers/methods")
             if path.relative_to(ROOT).parts[0] in PACKAGES
             for line, code in method_branches_in(path.read_text(), set(METHODS))]
    assert not found, "ask the method's MethodSpec instead of its name:\n" + "\n".join(found)


@pytest.mark.parametrize("source, named", [
    ('if cfg.stage.name != "sft":\n    pass\n', True),
    ('x = f"only stage {a} and stage dpo here"\n', True),
    ('x = ("reward", "dpo")\n', True),
    ('def f():\n    """stage sft in a docstring is documentation."""\n', False),
    ('x = "a reward model scores the answers"\n', False),
])
def test_the_stage_check_sees_a_named_stage(source, named):
    assert bool(stage_names_in(source, {"sft", "dpo", "reward", "rl"})) is named


@pytest.mark.parametrize("source, branches", [
    ('if cfg.method.name != "full":\n    pass\n', True),
    ('ok = name in ("lora", "qlora")\n', True),
    ('path = root / "adapter"\n', False),
])
def test_the_method_check_sees_a_branch_on_a_name(source, branches):
    assert bool(method_branches_in(source, {"full", "lora", "qlora", "adapter"})) is branches

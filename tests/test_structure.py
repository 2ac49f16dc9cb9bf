"""The package's shape: no import cycle (imports inside functions included), methods that share
code through methods/base.py and methods/lowrank.py rather than each other, one registry line per
method and per structural edit kind."""
import ast
from pathlib import Path

import compress
from compress.methods import EDITS, METHODS

PACKAGE = Path(compress.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("compress",) + path.relative_to(PACKAGE).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the compress modules it imports anywhere in its source (lazy imports too)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for module, path in mods.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - max(0, node.level - 1)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                graph[module].update(t for t in (subs or [target]) if t in mods and t != module)
            elif isinstance(node, ast.Import):
                graph[module].update(a.name for a in node.names if a.name in mods and a.name != module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_lazy_imports_included():
    graph = import_graph()
    assert "compress.data" in graph["compress.context"]  # the graph sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_methods_do_not_import_each_other():
    graph = import_graph()
    shared = {"compress.methods.base", "compress.methods.lowrank", "compress.methods", "compress.methods.allocation",
              "compress.methods.rank_allocation"}
    for name, cls in METHODS.items():
        module = cls.__module__
        siblings = {m for m in graph[module] if m.startswith("compress.methods.") and m not in shared
                    and not m.startswith(f"{module}_")}  # a method's own helper files are part of it
        assert not siblings, (module, siblings)


def test_every_edit_a_method_writes_is_registered():
    assert set(EDITS) == {"factorize", "prune_channels", "prune_heads", "remove_blocks"}
    for kind in EDITS.values():
        assert callable(kind.check) and callable(kind.apply)


def test_readme_report_table_is_generated_from_the_report_type():
    from compress.report import Report, keys_table

    from .conftest import REPO

    from dataclasses import fields

    from compress.report import Ratios, Side

    table = keys_table()
    assert table in (REPO / "README.md").read_text()
    documented = {key for line in table.splitlines()[2:] for key in line.split("|")[1].replace("`", "").split(", ")}
    expected = ({f.name for f in fields(Report)} | {f"ratios.{f.name}" for f in fields(Ratios)}
                | {f"{side}.{f.name}" for side in ("original", "compressed") for f in fields(Side)}) - {"original.onnx_metric"}
    assert {k.strip() for k in documented} == expected


# ---------------------------------------------------------------- floors

METHOD_NAMES = set(METHODS)
ABOVE_METHODS = {"compress.budget", "compress.pipeline", "compress.recipe", "compress.report", "compress.cli",
                 "compress.api", "compress.sweep", "compress.inspection", "compress.checkpoint", "compress.finetune"}


def _docstrings(tree) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def test_no_file_outside_the_methods_names_a_method():
    """The allocator, the plan, the report and the checkpoint know methods only through the registry
    and the capabilities they offer: no string equal to a method's name, no identifier naming one,
    no import of a method's own module."""
    offenders = []
    for module, path in _modules().items():
        if module.startswith("compress.methods"):
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            named = None
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                named = node.value if node.value in METHOD_NAMES else None
            elif isinstance(node, ast.Name) and node.id.lower() in METHOD_NAMES | {"envelope"}:
                named = node.id
            if named:
                offenders.append(f"{path.name}:{node.lineno} {named!r}")
    method_modules = {cls.__module__ for cls in METHODS.values()}
    for module, imports in import_graph().items():
        if not module.startswith("compress.methods"):
            offenders += [f"{module} imports {m}" for m in imports & method_modules]
    assert not offenders, offenders


def test_floors_hold():
    """Imports run down the floors only: the methods below everything that drives them; the bundled
    models and data below the pipeline (only their training sits above it); the machine facts and
    file readers below trust."""
    graph = import_graph()
    back = []
    for module, imports in graph.items():
        if module.startswith("compress.methods"):
            back += [f"{module} -> {m}" for m in imports & ABOVE_METHODS]
        if module.startswith("compress.examples") and module != "compress.examples.training":
            back += [f"{module} -> {m}" for m in imports
                     if not m.startswith("compress.examples") and m != "compress.errors"]
        if module != "compress.cli" and not module.startswith("compress.examples"):
            back += [f"{module} -> {m}" for m in imports if m == "compress.examples.training"]
        if module in ("compress.bench", "compress.files", "compress.system", "compress.schema"):
            back += [f"{module} -> {m}" for m in imports if m == "compress.trust"]
        if module in ("compress.files", "compress.system", "compress.schema"):
            back += [f"{module} -> {m}" for m in imports if m.startswith("compress.methods")]
    assert not back, back


def test_the_structure_rules_can_fail(tmp_path, monkeypatch):
    """The AST check sees a method name where one is written."""
    tree = ast.parse('x = "svd"\n"""doc"""\n')
    found = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in METHOD_NAMES
             and id(n) not in _docstrings(tree)]
    assert len(found) == 1


def test_every_reference_to_the_method_notes_points_into_the_repository():
    import re

    notes = PACKAGE.parent / "docs" / "methods.md"
    sections = set(re.findall(r"^## (\d+)\.", notes.read_text(), re.M))
    cited = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "METHODS.md" not in text, f"{path.name} cites notes outside the repository"
        cited += [(path.name, n) for n in re.findall(r"docs/methods\.md section (\d+)", text)]
    assert cited and all(n in sections for _, n in cited), [c for c in cited if c[1] not in sections]


LONGEST_FUNCTION = 65  # lines, signature and docstring included: a step that reads at once


def test_no_function_is_too_long_to_read_at_once():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_no_module_imports_another_modules_private_names():
    """What crosses a module is public: a name with a leading underscore stays in its module."""
    private = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("compress")):
                private += [f"{module} imports {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, private

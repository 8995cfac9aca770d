"""No import circle in the package: the imports of every module of `dino_jax/`, read from its source
with `ast` (nothing is imported, so this takes well under a second), form a graph without a cycle.

Both module-level imports and those deferred into a function count: a deferred import only moves
the circle to the first call (config.py's `load_run_config` imported `configs/base.py`, which
imported config.py for its error type). Imports under `if TYPE_CHECKING:` are never run and are
left out. A package's `__init__.py` runs before its modules, but every one of ours is empty, so a
module is not linked to the packages above it.
"""

from __future__ import annotations

import ast
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "dino_jax"


def module_names(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    """Dotted module name -> source file, for every .py file under `root/package`."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _import_nodes(tree: ast.AST):
    """Every import statement in `tree` outside `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if _is_type_checking_block(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        else:
            yield from _import_nodes(node)


def imported_modules(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The modules of `modules` that module `name` (source `path`) imports. `from a.b import c` is
    module `a.b.c` where that is one, else `a.b`; relative imports are resolved against `name`."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
            continue
        if node.level:
            # The package a relative import starts from: the module's own for __init__.py.
            anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
            source = ".".join(anchor + ([node.module] if node.module else []))
        else:
            source = node.module
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in modules:
                found.add(submodule)
            elif source in modules:
                found.add(source)
    found.discard(name)
    return found


def import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
    modules = module_names(root, package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected group of
    modules that import each other; [] for an acyclic graph."""
    # Tarjan's strongly connected components, iterative so a deep chain cannot hit the recursion limit.
    index, lowlink, on_stack, stack, groups = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = lowlink[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = lowlink[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    lowlink[node] = min(lowlink[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[node])
            if lowlink[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(set(group))
    return [_one_cycle(graph, group) for group in groups]


def _one_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A path through `group` (modules that all reach each other) back to where it started."""
    first = min(group)
    # Breadth-first from `first` within the group until an edge returns to it.
    previous = {first: None}
    queue = [first]
    for node in queue:
        for child in sorted(graph[node] & group):
            if child == first:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [*reversed(path), first]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"{sorted(group)} is not strongly connected")


def test_the_package_has_no_import_cycle():
    graph = import_graph(ROOT, PACKAGE)
    # The parser must see the imports for an empty answer to mean anything: module-level ones,
    # deferred ones, and `from package import module`.
    assert "dino_jax.errors" in graph["dino_jax.config"]  # module level
    assert "dino_jax.configs.base" in graph["dino_jax.config"]  # inside load_run_config
    assert "dino_jax.config" in graph["dino_jax.precision"]  # `from dino_jax import config as ...`
    cycles = import_cycles(graph)
    assert not cycles, "modules that import each other (a -> b: a imports b):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_a_cycle_through_a_deferred_or_relative_import_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "schema.py").write_text("from pkg.sub import checks\n")
    (package / "sub" / "checks.py").write_text("def check():\n    from ..schema import x\n")
    (package / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.schema\nimport os\n"
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.leaf"] == set()  # a TYPE_CHECKING import is never run
    assert import_cycles(graph) == [["pkg.schema", "pkg.sub.checks", "pkg.schema"]]
    os.remove(package / "sub" / "checks.py")
    assert import_cycles(import_graph(tmp_path, "pkg")) == []


def test_cycle_report_names_a_path_of_three():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]

"""The package's layout, measured: root modules, import cycles, forbidden imports, duplicated rules.

Prints what it found (one line per finding) and, on its last line, a JSON summary::

    {"root_modules": 7, "import_cycles": 0, "import_cycles_top_level": 0,
     "import_cycles_via_function_imports": 0, "training_imports_dump": 0,
     "format_imports_store": 0, "loss_imports_store_or_format": 0, "store_imports_upper": 0,
     "imports_cli": 0, "duplicate_rules": 0, ...}

``tests/test_layout.py`` calls the same functions and asserts the rules of ``../shared/DESIGN.md``.

**The import graph** is built from the source with :mod:`ast` (nothing is imported, so a broken
module is still measured). A node is a module of ``logitcache`` (a package is its
``__init__.py``). An edge ``a -> b`` is an import statement in ``a`` naming ``b``:
``import x.y`` names ``x.y``; ``from x.y import z`` names ``x.y.z`` when that is a module, else
``x.y``; relative imports are resolved; ``importlib.import_module("literal")`` counts too. Each edge
has a kind: ``top`` (runs when the module is imported), ``function`` (inside a function or method,
runs when it is called) or ``typing`` (under ``if TYPE_CHECKING:``, never runs, ignored).

- *Cycles* follow the edges as written, without the implicit "importing ``x.y.z`` first runs
  ``x/__init__`` and ``x/y/__init__``" (a package that re-exports its submodules would otherwise
  be a cycle with every submodule that imports a sibling: the convention of grimp/import-linter).
  A cycle is counted as one strongly connected component of more than one module (or a module
  that imports itself): modules that, together, import each other. ``import_cycles`` uses top and
  function edges, ``import_cycles_top_level`` top edges only; their difference is reported as
  ``import_cycles_via_function_imports`` (cycles that exist only because of a deferred import).
- *Forbidden imports* are checked transitively (a module counts if any chain of its imports
  reaches the forbidden side) and *with* the implicit parent-package edges, since those
  ``__init__`` files really run: that is what lands in ``sys.modules`` on a student's machine.

**Duplicate rules.** ``duplicate_rules`` is the sum, over four rules that must live in one place,
of (number of modules implementing the rule - 1). A module implements a rule when a function in
it matches the rule's pattern (a heuristic over the AST, documented per rule in ``RULES``):

- ``device_resolution``: a function that calls ``*.cuda.is_available()`` and builds
  ``torch.device("cuda"...)`` (picking a device, as ``_distributed.resolve_device`` does);
- ``rank_world``: a function that reads the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` environment
  variables or calls ``*.get_rank()``/``*.get_world_size()``;
- ``field_diff``: a function named ``*diff*``/``*differ*``/``*mismatch*``/``*changed*``, or one
  that compares ``a.get(k)``/``a[k]`` with ``b.get(k)``/``b[k]`` for a loop variable ``k``
  (the "which field changed" walk);
- ``topk_decode``: a function that runs ``cumsum`` over ``join_planes(...)`` (the id delta sum),
  or gathers a table by codes (``table[codes]``, ``take``, ``index_select``) and takes a ``log``
  (the dequantisation and its normaliser). Calling a shared helper that does this does not
  match, so a module that delegates is not counted.

False positives are possible (the patterns are syntactic); each finding is printed with its
``module:function`` so a reader can judge it.
"""

from __future__ import annotations

import ast
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "logitcache"
PREFIX = f"{PACKAGE}."
MAX_ROOT_MODULES = 8

TRAINING_SIDE = ("data", "loss", "train", "integrations")
# floors above format/: everything in the package but format itself, errors and the root __init__
FORMAT_MAY_IMPORT = ("format", "errors")
STORE_FORBIDDEN = ("dump", "train", "data", "loss", "cli", "transform", "integrations", "report")


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    kind: str  # "top", "function" or "typing"
    line: int


@dataclass
class Graph:
    modules: dict[str, Path]
    edges: list[Edge] = field(default_factory=list)

    def adjacency(self, kinds: Iterable[str], parents: bool = False) -> dict[str, set[str]]:
        """``src -> {dst}`` over edges of ``kinds``; ``parents`` adds each target's packages."""
        wanted = set(kinds)
        adj: dict[str, set[str]] = {m: set() for m in self.modules}
        for e in self.edges:
            if e.kind in wanted:
                adj[e.src].add(e.dst)
                if parents:
                    adj[e.src].update(p for p in _parents(e.dst) if p in self.modules)
        return adj


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root/logitcache``."""
    out: dict[str, Path] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def root_modules(root: Path = ROOT) -> list[str]:
    """Modules directly under ``logitcache/`` (``.py`` files; ``__init__``/``__main__`` count)."""
    return sorted(p.name for p in (root / PACKAGE).glob("*.py"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk_imports(tree: ast.Module) -> Iterator[tuple[ast.AST, str]]:
    """Every import-like node with its kind (top, function or typing)."""

    def visit(node: ast.AST, kind: str) -> Iterator[tuple[ast.AST, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from visit(child, "function" if kind != "typing" else kind)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from _with_self(stmt, "typing")
                for stmt in child.orelse:
                    yield from _with_self(stmt, kind)
            else:
                if isinstance(child, (ast.Import, ast.ImportFrom, ast.Call)):
                    yield child, kind
                yield from visit(child, kind)

    def _with_self(stmt: ast.AST, kind: str) -> Iterator[tuple[ast.AST, str]]:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt, kind
        yield from visit(stmt, kind)

    yield from visit(tree, "top")


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path = ROOT) -> Graph:
    modules = package_modules(root)
    graph = Graph(modules)
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_pkg = path.name == "__init__.py"
        for node, kind in _walk_imports(tree):
            for target in _targets(node, mod, is_pkg, modules):
                if target != mod:  # a package __init__ naming its own attributes
                    graph.edges.append(Edge(mod, target, kind, getattr(node, "lineno", 0)))
    return graph


def _targets(node: ast.AST, mod: str, is_pkg: bool, modules: dict[str, Path]) -> list[str]:
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = mod.split(".") if is_pkg else mod.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join([*base, *([node.module] if node.module else [])])
        else:
            prefix = node.module or ""
        names = [
            f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names
        ]
    elif isinstance(node, ast.Call) and _call_name(node) == "import_module" and node.args:
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            names = [arg.value]
    out = []
    for n in names:
        r = _resolve(n, modules) if n.split(".")[0] == PACKAGE else None
        if r is not None:
            out.append(r)
    return out


def strongly_connected(adj: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); returns components with a cycle (size > 1 or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(adj):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(adj[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(adj.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1 or node in adj.get(node, ()):
                    out.append(sorted(comp))
    return sorted(out)


def _path(adj: dict[str, set[str]], src: str, goal: Callable[[str], bool]) -> list[str] | None:
    """A shortest import chain from ``src`` to a module satisfying ``goal`` (BFS)."""
    prev: dict[str, str | None] = {src: None}
    queue = [src]
    for node in queue:
        for nxt in sorted(adj.get(node, ())):
            if nxt in prev:
                continue
            prev[nxt] = node
            if goal(nxt):
                chain = [nxt]
                while (p := prev[chain[-1]]) is not None:
                    chain.append(p)
                return chain[::-1]
            queue.append(nxt)
    return None


def _under(module: str, *floors: str) -> bool:
    return any(module == f"{PACKAGE}.{f}" or module.startswith(f"{PACKAGE}.{f}.") for f in floors)


def forbidden(
    graph: Graph, sources: Callable[[str], bool], target: Callable[[str], bool]
) -> dict[str, list[str]]:
    """Modules matching ``sources`` whose imports reach a ``target`` module: module -> chain."""
    adj = graph.adjacency(("top", "function"), parents=True)
    out = {}
    for mod in sorted(graph.modules):
        if sources(mod):
            chain = _path(adj, mod, target)
            if chain is not None:
                out[mod] = chain
    return out


def layout_rules(graph: Graph) -> dict[str, dict[str, list[str]]]:
    """The dependency rules of DESIGN.md, each as {offending module: import chain}."""

    def above_format(m: str) -> bool:
        return m.startswith(PREFIX) and not _under(m, *FORMAT_MAY_IMPORT)

    return {
        "training_imports_dump": forbidden(
            graph, lambda m: _under(m, *TRAINING_SIDE), lambda m: _under(m, "dump")
        ),
        "format_imports_store": forbidden(graph, lambda m: _under(m, "format"), above_format),
        "loss_imports_store_or_format": forbidden(
            graph,
            lambda m: _under(m, "loss"),
            lambda m: m.startswith(PREFIX) and not _under(m, "loss", "errors"),
        ),
        "store_imports_upper": forbidden(
            graph, lambda m: _under(m, "store"), lambda m: _under(m, *STORE_FORBIDDEN)
        ),
        "imports_cli": forbidden(
            graph,
            lambda m: not _under(m, "cli") and m not in (PACKAGE, f"{PACKAGE}.__main__"),
            lambda m: _under(m, "cli"),
        ),
    }


# -- duplicated rules -------------------------------------------------------------------------

_ENV_NAMES = {"RANK", "WORLD_SIZE", "LOCAL_RANK"}
_DIFF_WORDS = ("diff", "differ", "mismatch", "changed")


def _call_name(node: ast.AST) -> str:
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Attribute):
            return f.attr
        if isinstance(f, ast.Name):
            return f.id
    return ""


def _own_nodes(fn: ast.AST) -> Iterator[ast.AST]:
    """Nodes of a function, not descending into nested functions (they are judged alone)."""
    for child in ast.iter_child_nodes(fn):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child
            yield from _own_nodes(child)


def _is_device_resolution(fn: ast.AST) -> bool:
    nodes = list(_own_nodes(fn))
    asks = any(
        _call_name(n) == "is_available"
        and isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Attribute)
        and n.func.value.attr == "cuda"
        for n in nodes
    )
    builds = any(
        isinstance(n, ast.Call)
        and _call_name(n) == "device"
        and n.args
        and isinstance(n.args[0], ast.Constant)
        and str(n.args[0].value).startswith("cuda")
        for n in nodes
    )
    return asks and builds


def _is_rank_world(fn: ast.AST) -> bool:
    for n in _own_nodes(fn):
        if _call_name(n) in ("get_rank", "get_world_size"):
            return True
        if isinstance(n, ast.Constant) and n.value in _ENV_NAMES:
            return True
    return False


def _key_of(node: ast.AST) -> str | None:
    """``k`` for ``x.get(k)`` or ``x[k]`` with a plain name ``k``."""
    if isinstance(node, ast.Call) and _call_name(node) == "get" and node.args:
        arg = node.args[0]
        return arg.id if isinstance(arg, ast.Name) else None
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Name):
        return node.slice.id
    return None


def _is_field_diff(fn: ast.AST) -> bool:
    name = getattr(fn, "name", "").lower()
    if any(w in name for w in _DIFF_WORDS):
        return True
    loop_vars = {
        t.id
        for n in _own_nodes(fn)
        if isinstance(n, (ast.For, ast.comprehension))
        for t in ast.walk(n.target)
        if isinstance(t, ast.Name)
    }
    for n in _own_nodes(fn):
        if isinstance(n, ast.Compare) and len(n.ops) == 1 and isinstance(n.ops[0], ast.NotEq):
            a, b = _key_of(n.left), _key_of(n.comparators[0])
            if a is not None and a == b and a in loop_vars:
                return True
    return False


def _is_topk_decode(fn: ast.AST) -> bool:
    nodes = list(_own_nodes(fn))
    calls = {_call_name(n) for n in nodes}
    id_sum = "cumsum" in calls and "join_planes" in calls
    gathers_codes = bool(calls & {"take", "index_select"}) or any(
        isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Name) and "code" in n.slice.id
        for n in nodes
    )
    normalises = bool(calls & {"log", "log_"})
    return id_sum or (gathers_codes and normalises)


RULES: dict[str, Callable[[ast.AST], bool]] = {
    "device_resolution": _is_device_resolution,
    "rank_world": _is_rank_world,
    "field_diff": _is_field_diff,
    "topk_decode": _is_topk_decode,
}


def rule_sites(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """rule -> {module: [functions implementing it]}."""
    out: dict[str, dict[str, list[str]]] = {r: defaultdict(list) for r in RULES}
    for mod, path in package_modules(root).items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for rule, test in RULES.items():
                    if test(fn):
                        out[rule][mod].append(fn.name)
    return {r: dict(sites) for r, sites in out.items()}


def duplicates(sites: dict[str, dict[str, list[str]]]) -> dict[str, int]:
    return {rule: max(0, len(mods) - 1) for rule, mods in sites.items()}


# -- the summary ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Everything this script measures, with the details behind each count."""

    root_modules: list[str]
    cycles: list[list[str]]  # over top-level and function-level imports
    cycles_top_level: list[list[str]]
    rules: dict[str, dict[str, list[str]]]  # rule -> {offending module: import chain}
    rule_sites: dict[str, dict[str, list[str]]]  # duplicated rule -> {module: [functions]}

    def summary(self) -> dict[str, int]:
        dup = duplicates(self.rule_sites)
        return {
            "root_modules": len(self.root_modules),
            "import_cycles": len(self.cycles),
            "import_cycles_top_level": len(self.cycles_top_level),
            "import_cycles_via_function_imports": len(self.cycles) - len(self.cycles_top_level),
            **{name: len(offenders) for name, offenders in self.rules.items()},
            "duplicate_rules": sum(dup.values()),
            **{f"duplicate_{name}": n for name, n in dup.items()},
        }

    def report(self) -> list[str]:
        """One line per finding, for a reader."""
        lines = [
            f"root modules ({len(self.root_modules)}, at most {MAX_ROOT_MODULES}): "
            + ", ".join(self.root_modules)
        ]
        lines += [f"import cycle: {' <-> '.join(c)}" for c in self.cycles]
        lines += [f"top-level import cycle: {' <-> '.join(c)}" for c in self.cycles_top_level]
        for rule, offenders in self.rules.items():
            lines += [f"{rule}: {m} via {' -> '.join(chain)}" for m, chain in offenders.items()]
        for rule, mods in self.rule_sites.items():
            where = "; ".join(f"{m}:{','.join(fns)}" for m, fns in sorted(mods.items()))
            lines.append(f"{rule} implemented in {len(mods)} module(s): {where or '-'}")
        return lines


def measure(root: Path = ROOT) -> Layout:
    graph = import_graph(root)
    return Layout(
        root_modules=root_modules(root),
        cycles=strongly_connected(graph.adjacency(("top", "function"))),
        cycles_top_level=strongly_connected(graph.adjacency(("top",))),
        rules=layout_rules(graph),
        rule_sites=rule_sites(root),
    )


def main() -> int:
    layout = measure(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
    print("\n".join(layout.report()))
    print(json.dumps(layout.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

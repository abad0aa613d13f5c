"""The shape of the house, checked on the source: no import cycles, a pure domain, NATS and
SQL only in their adapters, and the apps holding the store by its protocol (`StoreApi`).

The graph is read with `ast`, so it sees every import statement wherever it stands: at module
level, inside functions (the lazy imports that hide cycles until run time) and under
`if TYPE_CHECKING:` (kept apart, since those never run). The allow-lists below name what is
known to be wrong today; each test fails when something new goes wrong, and also when an entry
is fixed, so that the entry is taken off and the list only shrinks.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

PACKAGE = "marduk_slurm"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Import cycles not yet broken (each entry: the modules of one cycle). Empty: controller/observe
# imports controller/http lazily, but http names observe only under `if TYPE_CHECKING:`, which
# never runs, so the pair is no cycle at run time.
CYCLES_TODO: frozenset[frozenset[str]] = frozenset()

# Modules outside marduk_slurm/adapters/ that still import nats-py (their imports under
# `if TYPE_CHECKING:` count too); the bus adapter should seal nats-py's messages and errors.
NATS_OUTSIDE_ADAPTERS_TODO: frozenset[str] = frozenset()

# Modules outside marduk_slurm/adapters/store/ that still run SQL on a connection themselves.
SQL_OUTSIDE_STORE_TODO: frozenset[str] = frozenset()

# Modules outside marduk_slurm/adapters/store/ that import the concrete SQLite `Store`: only
# those that open a database. Everything else takes a `StoreApi` (adapters/store/api.py).
OPENS_THE_STORE: frozenset[str] = frozenset({
    "marduk_slurm.controller.daemon",   # the writing connection, migrated at start
    "marduk_slurm.controller.context",  # StoreRunner: the read lane's read-only connections
    "marduk_slurm.controller.queries",  # worker_init: a query process's read-only connection
})

DOMAIN = f"{PACKAGE}.domain"
ADAPTERS = f"{PACKAGE}.adapters"
STORE = f"{PACKAGE}.adapters.store"
APPS = tuple(f"{PACKAGE}.{app}"
             for app in ("controller", "agent", "runtime", "cli", "lighthouse"))
SQL_METHODS = {"execute", "executemany", "query"}
# The modules that hold (`store`) or export (the package) the concrete class: importing one
# of them as a module, or `Store` from it, reaches the class.
STORE_CLASS_MODULES = {STORE, f"{STORE}.store"}
# A receiver that names a connection: conn, _conn, connection, db, self._db, store.db ...
CONNECTION_NAME = re.compile(r"^_*(conn|connection|db)(_|$)|_(conn|connection|db)$")


@dataclass
class ModuleImports:
    """What one module imports: `runtime` executes (module level or lazily), `typing` does not."""

    runtime: set[str] = field(default_factory=set)
    typing: set[str] = field(default_factory=set)
    sql_calls: list[int] = field(default_factory=list)  # line numbers
    store_class: list[int] = field(default_factory=list)  # imports of the concrete Store


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def project_files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of `from <node.module> import ...`, relative imports included."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    # A package's own module is its __init__: "." is the package itself.
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def imported_names(module: str, is_package: bool, node: ast.Import | ast.ImportFrom
                   ) -> Iterator[str]:
    """The modules an import statement names. `from pkg import sub` names pkg.sub when sub is
    a module of the project, else pkg (sub is then a name defined in pkg)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    source = resolve_from(module, is_package, node)
    for alias in node.names:
        candidate = f"{source}.{alias.name}"
        yield candidate if candidate in project_files() else source


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def receiver_names(expr: ast.expr) -> Iterator[str]:
    """Every identifier along a call's receiver: `self.store.db` gives db, store, self."""
    while True:
        if isinstance(expr, ast.Attribute):
            yield expr.attr
            expr = expr.value
        elif isinstance(expr, ast.Call):
            expr = expr.func
        elif isinstance(expr, ast.Subscript):
            expr = expr.value
        elif isinstance(expr, ast.Name):
            yield expr.id
            return
        else:
            return


def is_sql_method(node: ast.Attribute) -> bool:
    """`conn.execute`, `self.db.query` ...: called at once or kept to call later
    (`q = store.conn.execute`), either way SQL run outside the store."""
    if node.attr not in SQL_METHODS:
        return False
    return any(CONNECTION_NAME.search(name) for name in receiver_names(node.value))


class ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.is_package = is_package
        self.found = ModuleImports()
        self._typing_depth = 0

    def visit_If(self, node: ast.If) -> None:
        if not is_type_checking(node.test):
            self.generic_visit(node)
            return
        self._typing_depth += 1
        for child in node.body:
            self.visit(child)
        self._typing_depth -= 1
        for child in node.orelse:
            self.visit(child)

    def _add(self, node: ast.Import | ast.ImportFrom) -> None:
        target = self.found.typing if self._typing_depth else self.found.runtime
        names = set(imported_names(self.module, self.is_package, node))
        target.update(names)
        if names & STORE_CLASS_MODULES and (
                isinstance(node, ast.Import)
                or any(alias.name in {"Store", "*"} for alias in node.names)
                or any(f"{resolve_from(self.module, self.is_package, node)}.{alias.name}"
                       in STORE_CLASS_MODULES for alias in node.names)):
            self.found.store_class.append(node.lineno)

    def visit_Import(self, node: ast.Import) -> None:
        self._add(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self._add(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if is_sql_method(node):
            self.found.sql_calls.append(node.lineno)
        self.generic_visit(node)


@cache
def imports_of(module: str) -> ModuleImports:
    path = project_files()[module]
    visitor = ImportVisitor(module, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    return visitor.found


def project_graph() -> dict[str, set[str]]:
    """Run-time edges between project modules (a name that is not a module maps to its
    nearest enclosing project module)."""
    modules = project_files()
    graph: dict[str, set[str]] = {}
    for module in modules:
        edges = set()
        for name in imports_of(module).runtime:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add(name)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.add(frozenset(component))
    return found


def check_allow_list(found: set[str] | set[frozenset[str]], allowed: frozenset, rule: str,
                     name: str) -> None:
    new = sorted(map(str, set(found) - allowed))
    fixed = sorted(map(str, allowed - set(found)))
    assert not new, f"{rule}: new offenders {new}"
    assert not fixed, f"{rule}: fixed, take them off {name}: {fixed}"


def nats_importers() -> set[str]:
    return {
        module for module in project_files()
        if not within(module, ADAPTERS)
        and any(within(name, "nats") for name in
                imports_of(module).runtime | imports_of(module).typing)
    }


def sql_callers() -> set[str]:
    return {module for module in project_files()
            if not within(module, STORE) and imports_of(module).sql_calls}


def store_class_importers() -> set[str]:
    return {module for module in project_files()
            if not within(module, STORE) and imports_of(module).store_class}


# -- the checker itself, on small made-up sources --------------------------------------------

def test_cycle_finder_sees_a_cycle_through_a_lazy_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == {frozenset({"a", "b", "c"})}
    assert cycles({"a": {"b"}, "b": set()}) == set()


def test_visitor_reads_lazy_relative_and_type_checking_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import parse\n"
        "if TYPE_CHECKING:\n"
        "    from marduk_slurm.settings import Settings\n"
        "def later():\n"
        "    import nats.js\n"
        "    from ..errors import SlurmError\n"
        "    self.store.db.execute('SELECT 1')\n"
        "    conn().executemany('x', [])\n"
        "    self.bus.query('not sql')\n"
        "    q = store.conn.execute\n"
    )
    visitor = ImportVisitor(f"{PACKAGE}.adapters.slurm.base", is_package=False)
    visitor.visit(ast.parse(source))
    assert visitor.found.runtime == {
        "typing", f"{PACKAGE}.adapters.slurm.parse", "nats.js", f"{PACKAGE}.adapters.errors"}
    assert visitor.found.typing == {f"{PACKAGE}.settings"}
    assert visitor.found.sql_calls == [8, 9, 11]


def test_visitor_sees_the_concrete_store_however_it_is_imported() -> None:
    source = (
        "from marduk_slurm.adapters.store import StoreApi\n"
        "from marduk_slurm.adapters.store.mapping import replica_page_key\n"
        "from marduk_slurm.adapters.store import Store\n"
        "from marduk_slurm.adapters.store.store import Store as S\n"
        "import marduk_slurm.adapters.store\n"
        "from marduk_slurm.adapters import store\n"
        "from ..adapters.store import store as concrete\n"
        "if TYPE_CHECKING:\n"
        "    from marduk_slurm.adapters.store import Store\n"
    )
    visitor = ImportVisitor(f"{PACKAGE}.controller.inbound", is_package=False)
    visitor.visit(ast.parse(source))
    assert visitor.found.store_class == [3, 4, 5, 6, 7, 9]


def test_relative_import_inside_a_package_init() -> None:
    node = ast.parse("from .base import X").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert resolve_from(f"{PACKAGE}.adapters.slurm", True, node) == \
        f"{PACKAGE}.adapters.slurm.base"


# -- the rules, on the project ---------------------------------------------------------------

def test_graph_covers_the_project() -> None:
    graph = project_graph()
    assert f"{PACKAGE}.adapters.slurm.base" in graph
    # The lazy imports of the backend factory are edges too.
    assert f"{PACKAGE}.adapters.slurm.commands" in graph[f"{PACKAGE}.adapters.slurm.factory"]


def test_no_import_cycles() -> None:
    check_allow_list(cycles(project_graph()), CYCLES_TODO, "import cycles", "CYCLES_TODO")


def test_slurm_base_imports_none_of_its_siblings() -> None:
    siblings = {m for m in project_graph()[f"{PACKAGE}.adapters.slurm.base"]
                if within(m, f"{PACKAGE}.adapters.slurm")}
    assert not siblings


def test_domain_imports_no_adapter_and_no_app() -> None:
    bad = {
        (module, name)
        for module in project_files() if within(module, DOMAIN)
        for name in imports_of(module).runtime | imports_of(module).typing
        if within(name, ADAPTERS) or any(within(name, app) for app in APPS)
    }
    assert not bad, f"the domain must stay pure: {sorted(bad)}"


def test_nats_is_imported_only_by_adapters() -> None:
    check_allow_list(nats_importers(), NATS_OUTSIDE_ADAPTERS_TODO, "nats outside adapters/",
                     "NATS_OUTSIDE_ADAPTERS_TODO")


def test_sql_runs_only_in_the_store() -> None:
    check_allow_list(sql_callers(), SQL_OUTSIDE_STORE_TODO, "SQL outside adapters/store/",
                     "SQL_OUTSIDE_STORE_TODO")


def test_only_the_code_that_opens_a_database_names_the_concrete_store() -> None:
    check_allow_list(store_class_importers(), OPENS_THE_STORE,
                     "the concrete Store outside adapters/store/ (take a StoreApi)",
                     "OPENS_THE_STORE")

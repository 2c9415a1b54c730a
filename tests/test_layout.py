"""The layout rules, checked on the source (AST, nothing imported):

- the deployment boundary: common/ imports neither side; sites/ and server/ never import each
  other (they meet only through Flower messages); the hospital's launcher (launch/site.py)
  reaches nothing of the coordinator's package, directly or through what it imports;
- zero import cycles among the project's modules, counting imports inside functions and under
  `TYPE_CHECKING` (a cycle hidden in a function is still a cycle);
- an import inside a function says why on its line or the line above (it keeps a heavy or
  optional dependency lazy); no module imports another's private names;
- one home per concern: no sys.path editing in launch/, `os.replace` only in the atomic-write
  helper, run.json written only by the run lifecycle, no two modules whose names differ by a
  plural, server/strategies/ holding strategies only, and pyproject's package list matching the
  folders.
"""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOPS = ("common", "sites", "server", "launch")
NS = "chestfed"


def _modules() -> dict[str, Path]:
    out = {}
    for top in TOPS:
        for py in sorted((REPO / top).rglob("*.py")):
            parts = py.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((NS,) + parts)] = py
    return out


MODULES = _modules()
TREES = {m: ast.parse(p.read_text(), str(p)) for m, p in MODULES.items()}


def _resolve(name: str) -> str | None:
    """The longest project module that `name` (a dotted import target) names or lies in."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in MODULES:
            return cand
    return None


def _imports(module: str) -> list[tuple[ast.stmt, str, str]]:
    """(node, imported project module, imported name or '') for every import in `module`,
    wherever it is (top level, function, class, `if TYPE_CHECKING`)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for a in node.names:
                target = _resolve(a.name)
                if target:
                    out.append((node, target, ""))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            for a in node.names:
                target = _resolve(f"{src}.{a.name}") or _resolve(src)
                if target:
                    out.append((node, target, a.name if target == _resolve(src) else ""))
    return out


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for _, target, _ in _imports(m):
            # importing a.b.c runs a/__init__ and a/b/__init__ too
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in MODULES and dep != m and not m.startswith(dep + "."):
                    graph[m].add(dep)
    return graph


GRAPH = _graph()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _reach(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for d in GRAPH[m]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def _side(module: str) -> str:
    return module.split(".")[1]


def test_packages_respect_the_boundary():
    forbidden = {"common": {"sites", "server", "launch"}, "sites": {"server", "launch"},
                 "server": {"sites", "launch"}}
    bad = [f"{m} imports {d}" for m, deps in GRAPH.items() for d in deps
           if _side(d) in forbidden.get(_side(m), set())]
    assert not bad, "\n".join(sorted(bad))


def test_the_hospitals_launcher_reaches_nothing_of_the_coordinators_package():
    reached = sorted(m for m in _reach(f"{NS}.launch.site") if _side(m) == "server")
    assert not reached, f"launch/site.py reaches {reached}"


def test_no_import_cycles_counting_imports_inside_functions():
    cycles = _cycles(GRAPH)
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_the_graph_sees_imports_inside_functions_and_type_checking():
    """The cycle test is only as good as the graph: a made-up pair of modules that import each
    other inside a function and under TYPE_CHECKING is found."""
    a = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x.b\n")
    b = ast.parse("def f():\n    from x import a\n")
    assert any(isinstance(n, ast.Import) for n in ast.walk(a))
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(b))
    assert _cycles({"x.a": {"x.b"}, "x.b": {"x.a"}, "x.c": set()}) == [["x.a", "x.b"]]


def _function_imports(module: str):
    for fn in ast.walk(TREES[module]):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


def test_an_import_inside_a_function_says_why():
    bad = []
    for m, path in MODULES.items():
        lines = path.read_text().splitlines()
        for node in _function_imports(m):
            line = lines[node.lineno - 1]
            above = [lines[i].strip() for i in range(max(0, node.lineno - 3), node.lineno - 1)]
            if "#" not in line and not any(a.startswith("#") for a in above):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {line.strip()}")
    assert not bad, "imports inside functions without a comment saying why:\n" + "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    bad = []
    for m in MODULES:
        for node, target, name in _imports(m):
            if name.startswith("_") and not name.startswith("__") and target != m:
                bad.append(f"{MODULES[m].relative_to(REPO)}:{node.lineno} imports {target}.{name}")
    assert not bad, "\n".join(bad)


def _code_strings(tree: ast.AST) -> list[ast.Constant]:
    """String constants that are not docstrings."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docs.add(id(body[0].value))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


def test_launchers_do_not_edit_sys_path():
    bad = [str(p.relative_to(REPO)) for p in (REPO / "launch").glob("*.py")
           if re.search(r"\bsys\.path\b", "\n".join(
               line for line in p.read_text().splitlines() if not line.lstrip().startswith("#")))]
    assert not bad, f"sys.path edited in {bad}"


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    owner, _, attr = dotted.rpartition(".")
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute) and n.func.attr == attr
            and isinstance(n.func.value, ast.Name) and n.func.value.id == owner]


def test_one_atomic_write_helper():
    owners = sorted(str(MODULES[m].relative_to(REPO)) for m in MODULES
                    if _calls(TREES[m], "os.replace") or _calls(TREES[m], "os.rename"))
    assert owners == ["common/atomic.py"], owners
    bench = [str(p.relative_to(REPO)) for p in (REPO / "bench").glob("*.py")
             if _calls(ast.parse(p.read_text()), "os.replace")]
    assert not bench, f"bench/ writes its own atomic files: {bench}"


def test_run_json_is_written_by_the_run_lifecycle_only():
    """The file name appears in code (not prose) only in the lifecycle module; every other
    module reads and writes run.json through it."""
    owners = sorted(str(MODULES[m].relative_to(REPO)) for m in MODULES
                    if any("run.json" == n.value for n in _code_strings(TREES[m])))
    assert owners == ["server/run/lifecycle.py"], owners


def test_no_two_modules_differ_by_a_plural():
    """No two files whose names differ by a plural (the old checkpoint.py / checkpoints.py).
    A file beside a package of its plural is fine: launch/site.py runs a site of sites/."""
    names = {p.stem for p in MODULES.values() if p.stem != "__init__"}
    clashes = sorted(n for n in names if n + "s" in names)
    assert not clashes, [f"{n} / {n}s" for n in clashes]


def test_server_strategies_holds_strategies_only():
    """Every module of server/strategies/ is a strategy the registry runs (its name is a
    strategy's name); the round loop and the privacy wrappers live elsewhere."""
    from chestfed.common.config import STRATEGIES

    mods = {p.stem for p in (REPO / "server" / "strategies").glob("*.py")
            if p.stem not in ("__init__", "registry")}
    assert mods <= set(STRATEGIES), f"not strategies: {sorted(mods - set(STRATEGIES))}"


def test_pyproject_installs_exactly_the_package_folders():
    """Only `chestfed.*` is installed (no generic top-level names such as `common` or `server`
    that another distribution could also install), and every folder with an __init__.py is in
    the list: a missing one would import from the checkout but not from a wheel."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    folders = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert listed == folders, (sorted(listed - folders), sorted(folders - listed))
    assert all(name == NS or name.startswith(NS + ".") for name in listed)
    assert set(cfg["package-dir"]) == {f"{NS}.{t}" for t in TOPS}

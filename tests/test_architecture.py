"""The package boundaries: ferengine imports neither trainers nor app, and its modules form no import cycle
(counting imports inside functions too, except those only for type checkers); app never imports trainers;
every ferengine and trainers module imports on its own, first, in a fresh package state."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> set[str]:
    """Every module ``module`` imports (absolute names), anywhere in the file but under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[: len(base) - node.level + 1]
                target = ".".join(pkg + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for a in node.names:  # `from . import x` / `from pkg import submodule`
                found.add(f"{target}.{a.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph(package: str) -> dict[str, set[str]]:
    mods = _modules(package)
    g = {}
    for name, path in mods.items():
        deps = set()
        for imp in _imports(name, path):
            # the module itself or its nearest existing parent in this package
            parts = imp.split(".")
            while parts and ".".join(parts) not in mods:
                parts.pop()
            if parts and ".".join(parts) != name:
                deps.add(".".join(parts))
        g[name] = deps
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles, ignoring a package's imports of its own submodules (``__init__`` re-exports)."""
    def edges(n):
        return {d for d in g[n] if not d.startswith(n + ".")}

    found, state, stack = [], {}, []

    def dfs(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(edges(n)):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                dfs(d)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            dfs(n)
    return found


def test_ferengine_imports_neither_trainers_nor_app():
    for name, path in _modules("ferengine").items():
        bad = sorted(i for i in _imports(name, path) if i.split(".")[0] in ("trainers", "app"))
        assert not bad, f"{name} imports {bad}"


def test_app_does_not_import_trainers_and_trainers_not_app():
    for pkg, banned in (("app", "trainers"), ("trainers", "app")):
        for name, path in _modules(pkg).items():
            bad = sorted(i for i in _imports(name, path) if i.split(".")[0] == banned)
            assert not bad, f"{name} imports {bad}"


def test_ferengine_has_no_import_cycle():
    assert _cycles(_graph("ferengine")) == []


def test_the_cycle_check_sees_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"p": {"p.x"}, "p.x": {"p"}}) == []


def test_every_module_imports_on_its_own():
    """Each module imported first, with every module of the project forgotten before it (torch etc. stay)."""
    names = [n for pkg in ("ferengine", "trainers") for n in _modules(pkg) if not n.endswith("__main__")]
    code = (
        "import importlib, sys, traceback\n"
        f"names = {names!r}\n"
        "bad = []\n"
        "for n in names:\n"
        "    for m in [m for m in sys.modules if m.split('.')[0] in ('ferengine', 'trainers')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception:\n"
        "        bad.append((n, traceback.format_exc(limit=3)))\n"
        "for n, tb in bad:\n"
        "    print('FAILED', n, tb)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]

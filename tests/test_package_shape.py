"""The shape of the `tuner` package, read from its source (nothing is imported):

- no import circles among its modules, counting imports inside functions (they run too) but not
  those under `if TYPE_CHECKING:` (they never run);
- no module uses another module's private names: `from tuner.x import _f`, `x._f` on an imported
  tuner module, or `obj._f` where `_f` is a private function, method or class defined in another
  file (`self._f` and `cls._f` are a class's own business). A leading-underscore *module*, such as
  tuner/storage/_optuna.py (the one home of Optuna's private names), may be imported: that is what
  it is for.
- every import inside a function (one not under `if TYPE_CHECKING:`) says on its line why it is
  there: a trailing `# ...` comment, on the first line of a parenthesized multi-line import. An
  import stays inside a function only where start-up needs it (the read-side commands import no
  torch; Optuna is imported only after its version is checked); all others are at the module top.

Each check is also run on a small planted package, to show that it catches what it should.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tuner"


# ---------------------------------------------------------------------------------------------
# Reading a package
# ---------------------------------------------------------------------------------------------

def modules(package: Path) -> dict[str, Path]:
    """Every module of the package directory, by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def type_checking_only(tree: ast.AST) -> set[int]:
    """The ids of the nodes under `if TYPE_CHECKING:` (or `if typing.TYPE_CHECKING:`)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The dotted name `from <level dots><name> import ...` refers to, inside `module`."""
    if not level:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def owner(name: str, mods: dict[str, Path]) -> str | None:
    """The package module `name` is, or lives in (its longest prefix that is a module)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, mods: dict[str, Path], *, runtime: bool = True) -> Iterator[tuple[str, int, str | None]]:
    """(imported package module, line, name imported from it or None) for each import in `module`;
    `runtime`: leave out those under `if TYPE_CHECKING:`."""
    path = mods[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = type_checking_only(tree) if runtime else set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = owner(alias.name, mods)
                if target:
                    yield target, node.lineno, None
        elif isinstance(node, ast.ImportFrom):
            base = absolute(module, path.name == "__init__.py", node.level, node.module)
            for alias in node.names:
                if f"{base}.{alias.name}" in mods:  # a submodule: `from tuner.storage import keys`
                    yield f"{base}.{alias.name}", node.lineno, None
                elif (target := owner(base, mods)) is not None:
                    yield target, node.lineno, alias.name


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------

def import_circles(package: Path) -> list[list[str]]:
    """The import circles: each a sorted list of modules that import each other, directly or not."""
    mods = modules(package)
    graph = {m: sorted({t for t, _, _ in imports(m, mods)} - {m}) for m in mods}
    # Tarjan's strongly connected components, iteratively
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        circles.append(sorted(component))
    return sorted(circles)


def private_reaches(package: Path) -> list[str]:
    """Each place a module uses another module's private name, as `FILE:LINE what`."""
    mods = modules(package)
    shown = {m: p.relative_to(package.parent).as_posix() for m, p in mods.items()}
    trees = {m: ast.parse(p.read_text(encoding="utf-8")) for m, p in mods.items()}
    defined: dict[str, set[str]] = {}  # private function, method and class names -> modules defining them
    for m, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and is_private(node.name):
                defined.setdefault(node.name, set()).add(m)
    hits: set[str] = set()
    for m, tree in trees.items():
        bound: set[str] = set()  # local names bound to package modules
        for target, line, name in imports(m, mods, runtime=False):
            if name is not None and is_private(name):
                hits.add(f"{shown[m]}:{line} imports {name} from {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bound.update(a.asname or a.name.split(".")[0] for a in node.names if owner(a.name, mods))
            elif isinstance(node, ast.ImportFrom):
                base = absolute(m, mods[m].name == "__init__.py", node.level, node.module)
                bound.update(a.asname or a.name for a in node.names if f"{base}.{a.name}" in mods)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not is_private(node.attr):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in bound:
                if not any(f"{mod}.{node.attr}" in mods for mod in mods if mod.rpartition(".")[2] == value.id):
                    hits.add(f"{shown[m]}:{node.lineno} uses {value.id}.{node.attr}")
            elif node.attr in defined and m not in defined[node.attr] and not (
                    isinstance(value, ast.Name) and value.id in ("self", "cls")):
                hits.add(f"{shown[m]}:{node.lineno} calls {node.attr} of {', '.join(sorted(defined[node.attr]))}")
    return sorted(hits, key=lambda h: (h.split(":")[0], int(h.split(":")[1].split()[0]), h))


def uncommented_function_imports(package: Path) -> list[str]:
    """Each import inside a function (not under `if TYPE_CHECKING:`) with no comment on its (first)
    line, as `FILE:LINE the import line`."""
    mods = modules(package)
    hits: list[str] = []
    for path in mods.values():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        skipped = type_checking_only(tree)
        commented = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                     if tok.type == tokenize.COMMENT}
        lines = text.splitlines()
        seen: set[int] = set()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if (isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skipped
                        and node.lineno not in seen):
                    seen.add(node.lineno)
                    if node.lineno not in commented:
                        shown = path.relative_to(package.parent).as_posix()
                        hits.append(f"{shown}:{node.lineno} {lines[node.lineno - 1].strip()}")
    return sorted(hits, key=lambda h: (h.split(":")[0], int(h.split(":")[1].split()[0])))


# ---------------------------------------------------------------------------------------------
# tuner
# ---------------------------------------------------------------------------------------------

def test_tuner_has_no_import_circles() -> None:
    circles = import_circles(ROOT)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_no_tuner_module_uses_another_ones_private_names() -> None:
    hits = private_reaches(ROOT)
    assert not hits, "private names used across modules:\n" + "\n".join(hits)


def test_every_import_inside_a_function_says_why() -> None:
    bare = uncommented_function_imports(ROOT)
    assert not bare, ("imports inside functions with no comment on their line saying why (move them to the "
                      "module top, or say what start-up cost they avoid):\n" + "\n".join(bare))


def test_the_walk_sees_the_whole_package() -> None:
    mods = modules(ROOT)
    assert {"tuner", "tuner.cli", "tuner.cli.app", "tuner.storage._optuna", "tuner.insight.report.panels"} <= set(mods)
    targets = {t for t, _, _ in imports("tuner.cli.train", mods)}
    assert {"tuner.cli.app", "tuner.cli.common", "tuner.study.params", "tuner.training.train"} <= targets
    assert "tuner.cli.app" in {t for t, _, _ in imports("tuner.cli.query", mods)}


# ---------------------------------------------------------------------------------------------
# The checks on planted packages
# ---------------------------------------------------------------------------------------------

def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path / "pkg"


BASE = {"pkg/__init__.py": "", "pkg/sub/__init__.py": ""}


def test_a_circle_through_an_import_inside_a_function_is_found(tmp_path: Path) -> None:
    pkg = plant(tmp_path, {**BASE,
                           "pkg/a.py": "from pkg.sub import b\n",
                           "pkg/sub/b.py": "def f():\n    from ..c import g\n    return g\n",
                           "pkg/c.py": "import pkg.a\n",
                           "pkg/d.py": "from . import a\n"})
    assert import_circles(pkg) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_a_circle_that_only_type_checking_closes_is_not_one(tmp_path: Path) -> None:
    pkg = plant(tmp_path, {**BASE,
                           "pkg/a.py": "from pkg import b\n",
                           "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import X\n",
                           "pkg/c.py": "import typing\nfrom . import d\nif typing.TYPE_CHECKING:\n    import pkg.d\n",
                           "pkg/d.py": "def f():\n    from .c import y\n"})
    assert import_circles(pkg) == [["pkg.c", "pkg.d"]]  # c imports d at run time, not only for types


def test_relative_imports_resolve_to_modules(tmp_path: Path) -> None:
    pkg = plant(tmp_path, {**BASE,
                           "pkg/sub/__init__.py": "from .x import thing\nfrom .. import top\n",
                           "pkg/sub/x.py": "from ..top import name\nfrom . import y\nthing = 1\n",
                           "pkg/sub/y.py": "",
                           "pkg/top.py": "name = 1\n"})
    mods = modules(pkg)
    assert sorted(imports("pkg.sub", mods)) == [("pkg.sub.x", 1, "thing"), ("pkg.top", 2, None)]
    assert sorted(imports("pkg.sub.x", mods)) == [("pkg.sub.y", 2, None), ("pkg.top", 1, "name")]
    assert import_circles(pkg) == []  # `from . import y` in pkg/sub/x.py is pkg.sub.y, not pkg.sub


def test_private_names_used_across_modules_are_found(tmp_path: Path) -> None:
    pkg = plant(tmp_path, {**BASE,
                           "pkg/a.py": ("def _helper():\n    pass\n\nclass _Box:\n    pass\n\n"
                                        "class Worker:\n    def _step(self):\n        return self._own()\n"
                                        "    def _own(self):\n        pass\n"),
                           "pkg/_shim.py": "def hidden():\n    pass\n",
                           "pkg/b.py": ("from pkg.a import _helper\nfrom .a import Worker\n"
                                        "from pkg import _shim\nfrom pkg._shim import hidden\n"
                                        "def run(w: Worker):\n    w._step()\n    return _shim.hidden()\n"),
                           "pkg/c.py": "import pkg.a as a\nfrom pkg import a as same\n\nx = a._Box\ny = same._CONST\n",
                           "pkg/d.py": "class Own:\n    def _helper(self):\n        return self._helper()\n"})
    assert private_reaches(pkg) == [
        "pkg/b.py:1 imports _helper from pkg.a",
        "pkg/b.py:6 calls _step of pkg.a",
        "pkg/c.py:4 uses a._Box",
        "pkg/c.py:5 uses same._CONST",
    ]


def test_an_import_inside_a_function_without_a_comment_is_found(tmp_path: Path) -> None:
    pkg = plant(tmp_path, {**BASE,
                           "pkg/a.py": ("import json\n"  # the module top: no comment needed
                                        "from typing import TYPE_CHECKING\n\n"
                                        "def f():\n"
                                        "    import os\n"  # bare: found
                                        "    import sys  # why: it is cheap\n"
                                        "    if TYPE_CHECKING:\n"
                                        "        from pkg.sub import b\n"  # never runs: not counted
                                        "    from pkg.sub import (  # pkg.sub: only when f runs\n"
                                        "        b,\n"
                                        "    )\n"
                                        "    from pkg.sub import (\n"  # the comment is not on the first line: found
                                        "        b as c,  # too late\n"
                                        "    )\n"
                                        "    import math; s = '# not a comment'\n"  # a '#' in a string: found
                                        "    return json, os, sys, b, c, math, s\n"),
                           "pkg/sub/b.py": ("class K:\n"
                                            "    async def g(self):\n"
                                            "        def inner():\n"
                                            "            from .. import a\n"  # nested: found
                                            "            return a\n"
                                            "        return inner\n")})
    assert uncommented_function_imports(pkg) == [
        "pkg/a.py:5 import os",
        "pkg/a.py:12 from pkg.sub import (",
        "pkg/a.py:15 import math; s = '# not a comment'",
        "pkg/sub/b.py:4 from .. import a",
    ]

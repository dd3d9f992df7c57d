"""Checks the entries of ``internals.INTERNALS`` against a vLLM source tree, statically.

A source tree is the directory that holds the ``vllm`` package: the installed one
(``SourceTree.installed()``, for ``probe_vllm`` before an engine starts) or a release's
wheel unzipped (``scripts/vllm_compat.py``: the CUDA wheel cannot be imported without its
GPU build of torch). Each module is read with ``ast`` and never imported, so the check
runs anywhere, in well under a second, and cannot start anything.

Classes are followed through their bases where those are vLLM's own (defined in the same
module or imported from another ``vllm`` module), so a method or attribute moved to a
base class still counts.

This module knows nothing about bon-sr's hook, engines or the version gate (``KNOWN_VLLM``).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .internals import INTERNALS, Internal

_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class Finding:
    """One entry's result: ``ok``, and ``detail`` saying what is missing (or where it was found)."""

    entry: Internal
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        e = self.entry
        return {"key": e.key, "area": e.area, "kind": e.kind, "module": e.module, "name": e.name, "ok": self.ok,
                "detail": self.detail}


class SourceTree:
    """A vLLM source tree: ``root`` holds ``vllm/``. Modules are parsed once, on demand."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._trees: dict[str, ast.Module | None] = {}

    @classmethod
    def installed(cls) -> "SourceTree":
        """The installed vLLM's tree, found without importing vLLM."""
        spec = find_spec("vllm")
        if spec is None or not spec.origin:
            raise RuntimeError("vLLM is not installed")
        return cls(Path(spec.origin).parent.parent)

    def version(self) -> str | None:
        """``vllm/_version.py``'s ``__version__`` (None when the tree has none)."""
        tree = self.module("vllm._version")
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "__version__" for t in targets):
                    return str(node.value.value)
        return None

    def path(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def relpath(self, module: str) -> str:
        found = self.path(module)
        return str(found.relative_to(self.root)) if found else module.replace(".", "/") + ".py"

    def module(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            found = self.path(module)
            self._trees[module] = None if found is None else ast.parse(found.read_bytes(), filename=str(found))
        return self._trees[module]

    # -- names ----------------------------------------------------------------------------

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = module.split(".")
        is_package = (self.path(module) or Path()).name == "__init__.py"
        base = package if is_package else package[:-1]
        base = base[:len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def imported(self, module: str, name: str) -> tuple[str, str] | None:
        """Where ``name`` comes from when ``module`` imports it: (source module, its name there)."""
        tree = self.module(module)
        for node in _top_level(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name and alias.name != "*":
                        return self._absolute(module, node), alias.name
        return None

    def find_class(self, module: str, name: str, _depth: int = 0) -> tuple[str, ast.ClassDef] | None:
        """The class ``name`` as ``module`` sees it: defined there or imported from a vLLM module."""
        tree = self.module(module)
        for node in _top_level(tree):
            if isinstance(node, ast.ClassDef) and node.name == name:
                return module, node
        source = self.imported(module, name)
        if source and source[0].startswith("vllm") and _depth < 8:
            return self.find_class(source[0], source[1], _depth + 1)
        return None

    def chain(self, module: str, cls: ast.ClassDef) -> list[tuple[str, ast.ClassDef]]:
        """``cls`` and its vLLM bases, nearest first (bases outside vLLM are skipped)."""
        out: list[tuple[str, ast.ClassDef]] = []
        todo = [(module, cls)]
        while todo:
            mod, node = todo.pop(0)
            if any(n is node for _, n in out):
                continue
            out.append((mod, node))
            for base in node.bases:
                name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
                found = self.find_class(mod, name) if name else None
                if found is not None:
                    todo.append(found)
        return out

    def exports(self, module: str, name: str, _seen: frozenset[str] = frozenset()) -> bool:
        """``from module import name`` works: defined, imported, named in a lazy-import table,
        or star-imported from a module that exports it."""
        tree = self.module(module)
        if tree is None or module in _seen:
            return False
        for node in _top_level(tree):
            if isinstance(node, (ast.ClassDef, *_FUNCS)) and node.name == name:
                return True
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return True
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name == "*":
                        if self.exports(self._absolute(module, node), name, _seen | {module}):
                            return True
                    elif (alias.asname or alias.name) == name:
                        return True
        # a lazy module __getattr__ with a table of names ("LLM": ".entrypoints.llm:LLM")
        return any(isinstance(n, ast.Constant) and n.value == name for n in ast.walk(tree))

    def function(self, module: str, qualname: str) -> tuple[str, ast.FunctionDef | ast.AsyncFunctionDef] | None:
        """``f`` at module level, or ``Class.method`` (inherited methods count)."""
        cls_name, _, func = qualname.rpartition(".")
        if not cls_name:
            for node in _top_level(self.module(module)):
                if isinstance(node, _FUNCS) and node.name == func:
                    return module, node
            return None
        found = self.find_class(module, cls_name)
        if found is None:
            return None
        for mod, cls in self.chain(*found):
            for node in cls.body:
                if isinstance(node, _FUNCS) and node.name == func:
                    return mod, node
        return None

    def attributes(self, module: str, cls: ast.ClassDef) -> set[str]:
        """Names assigned on the class or its vLLM bases: fields, methods and properties,
        and ``self.<name>`` assigned in any method."""
        names: set[str] = set()
        for _, node in self.chain(module, cls):
            for stmt in node.body:
                if isinstance(stmt, (ast.AnnAssign, ast.Assign)):
                    for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]):
                        names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
                elif isinstance(stmt, (*_FUNCS, ast.ClassDef)):
                    names.add(stmt.name)
                if isinstance(stmt, _FUNCS):
                    names.update(_self_assigned(stmt))
        return names


def _top_level(tree: ast.Module | None) -> Iterator[ast.stmt]:
    """Module-level statements, also inside ``if``/``try`` blocks (``if TYPE_CHECKING:``)."""
    todo = list(tree.body) if tree is not None else []
    while todo:
        node = todo.pop(0)
        yield node
        if isinstance(node, ast.If):
            todo[:0] = [*node.body, *node.orelse]
        elif isinstance(node, ast.Try):
            todo[:0] = [*node.body, *[s for h in node.handlers for s in h.body], *node.orelse, *node.finalbody]


def _self_assigned(func: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    if not func.args.args:
        return set()
    me = func.args.args[0].arg
    out = set()
    for node in ast.walk(func):
        todo = list(node.targets if isinstance(node, ast.Assign) else
                    [node.target] if isinstance(node, ast.AnnAssign) else [])
        while todo:  # `self.x = ...`, `self.x: T = ...`, `self.a, self.b = ...`; not `self.x.y = ...`
            t = todo.pop()
            if isinstance(t, (ast.Tuple, ast.List)):
                todo.extend(t.elts)
            elif isinstance(t, ast.Starred):
                todo.append(t.value)
            elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == me:
                out.add(t.attr)
    return out


def _identifiers(node: ast.AST) -> set[str]:
    out: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            out.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            out.add(sub.attr)
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            out.add(sub.value)
        elif isinstance(sub, ast.ImportFrom):
            out.add(sub.module or "")
            out.update(a.name for a in sub.names)
        elif isinstance(sub, ast.Import):
            out.update(a.name for a in sub.names)
    return out


def _params(func: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[list[str], list[str]]:
    """(positional parameter names without self/cls, every named parameter)."""
    a = func.args
    positional = [p.arg for p in (*a.posonlyargs, *a.args)]
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in func.decorator_list)
    if positional and positional[0] in ("self", "cls") and not static:
        positional = positional[1:]
    return positional, positional + [p.arg for p in a.kwonlyargs]


def _env_keys(tree: SourceTree) -> set[str] | None:
    for node in _top_level(tree.module("vllm.envs")):
        target = node.targets[0] if isinstance(node, ast.Assign) else node.target if isinstance(
            node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == "environment_variables" and isinstance(node.value, ast.Dict):
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return None


def check_one(entry: Internal, tree: SourceTree) -> Finding:
    """Check one entry against ``tree``; the finding's detail names what is missing."""
    e = entry
    where = tree.relpath(e.module)

    def result(missing: Sequence[str], found: str = "") -> Finding:
        if missing:
            return Finding(e, False, f"{where}: no {', '.join(missing)}")
        return Finding(e, True, found or where)

    if tree.module(e.module) is None:
        return Finding(e, False, f"no module {e.module} ({where})")
    if e.kind == "module":
        return result([])
    if e.kind == "class":
        found = tree.find_class(e.module, e.name)
        if found is None:
            return result([f"class {e.name}"])
        chain = {f"{m}.{c.name}" for m, c in tree.chain(*found)}
        missing = [f"base {b}" for b in e.bases if b not in chain]
        attrs = tree.attributes(*found)
        missing += [f"{e.name}.{a}" for a in e.attrs if a not in attrs]
        return result(missing)
    if e.kind == "function":
        found_f = tree.function(e.module, e.name)
        if found_f is None:
            return result([f"def {e.name}"])
        positional, named = _params(found_f[1])
        if e.positional and positional[:len(e.params)] != list(e.params):
            return result([f"{e.name}({', '.join(e.params)}, ...) (found {e.name}({', '.join(positional)}))"])
        missing = [f"parameter {e.name}({p})" for p in e.params if p not in named]
        a = found_f[1].args
        shown = named + ([f"*{a.vararg.arg}"] if a.vararg else []) + ([f"**{a.kwarg.arg}"] if a.kwarg else [])
        return result(missing, f"{tree.relpath(found_f[0])}: {e.name}({', '.join(shown)})")
    if e.kind == "export":
        return result([] if tree.exports(e.module, e.name) else [f"{e.name} to import from {e.module}"])
    if e.kind == "env":
        keys = _env_keys(tree)
        if keys is None:
            return result(["environment_variables table"])
        return result([] if e.name in keys else [f"environment variable {e.name}"])
    if e.kind == "uses":
        if e.name:
            found_f = tree.function(e.module, e.name)
            if found_f is None:
                return result([f"def {e.name}"])
            node: ast.AST = found_f[1]
        else:
            node = tree.module(e.module)  # type: ignore[assignment]
        seen = _identifiers(node)
        return result([f"mention of {r!r} in {e.name or e.module}" for r in e.refs if r not in seen])
    return Finding(e, False, f"unknown kind {e.kind!r} (known: module, class, function, export, env, uses)")


def check(tree: SourceTree, entries: Iterable[Internal] = INTERNALS) -> list[Finding]:
    """Every entry's finding, in the table's order."""
    return [check_one(e, tree) for e in entries]


def failures(tree: SourceTree, entries: Iterable[Internal] = INTERNALS) -> list[str]:
    """``"<entry>: <what is missing>"`` for each entry that fails (empty: all pass)."""
    return [f"{f.entry.module}:{f.entry.name or '*'} ({f.detail})" for f in check(tree, entries) if not f.ok]

"""Code versions for stage keys: a hash of the science a stage runs, derived from the sources.

    from foresight_core.provenance import code_version
    code_version("foresight_core.corpus")      # '0.1.0+3f2a9c1e0b7d'
    code_version("tasks.train")      # what WM-AMT / FE-SFT run: sft, packing, models, ...

A stage's result is reused when its key matches a finished run; the key holds the config, the
inputs' hashes and this version, so editing the code a stage runs retrains that stage and only
that stage. The version is found, not listed: starting from the stage's entry module, every
``import`` / ``from ... import`` in the source (function-level ones included) is followed inside the
walked packages, and the files of ``foresight_core`` that this reaches are hashed, with the package
version and the versions of the libraries that compute (torch, transformers, ...).

Not hashed: ``foresight_core.config`` (a config's *values* are in every key already, so a new
field or a docstring does not retrain anything by itself) and the adapters (``tasks``,
``flows``: they move references and start jobs; they are walked, to find which science
a stage reaches, but their own bytes do not count).
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path

import foresight_core

# the packages whose imports are followed, and where their sources are (None: found at call time)
HASHED_PACKAGE = "foresight_core"
NOT_HASHED = ("foresight_core.config",)
# libraries whose version changes what a stage computes
LIBRARIES = ("torch", "transformers", "peft", "math-verify", "bm25s")


def package_roots() -> dict[str, Path]:
    """``{package name: source folder}`` of this install: the science and its adapters."""
    roots = {HASHED_PACKAGE: Path(foresight_core.__file__).parent}
    for name in ("tasks", "flows"):
        try:
            import importlib.util

            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            roots[name] = Path(list(spec.submodule_search_locations)[0])
    return roots


def module_file(module: str, roots: Mapping[str, Path]) -> Path | None:
    """The source file of ``module`` if it lies in one of ``roots`` (a package's ``__init__.py``)."""
    top, _, rest = module.partition(".")
    root = roots.get(top)
    if root is None:
        return None
    base = root.joinpath(*rest.split(".")) if rest else root
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, module: str) -> set[str]:
    """Every module name an import statement of ``path`` may name (``from a import b``: ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{alias.name}" for alias in node.names)
    return out


def reached_modules(entries: Iterable[str], roots: Mapping[str, Path]) -> dict[str, Path]:
    """``{module: file}`` of every module in ``roots`` that the entries import, directly or not."""
    seen: dict[str, Path] = {}
    todo = list(entries)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = module_file(module, roots)
        if path is None:
            continue
        seen[module] = path
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(_imported_modules(path, module))
    return seen


def _hashed(module: str) -> bool:
    return (module == HASHED_PACKAGE or module.startswith(HASHED_PACKAGE + ".")) and not any(
        module == n or module.startswith(n + ".") for n in NOT_HASHED)


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def source_hash(entries: Iterable[str], roots: Mapping[str, Path]) -> str:
    """sha256 (12 hex digits) of the hashed files the entries reach, by module name and bytes."""
    h = hashlib.sha256()
    for module, path in sorted(reached_modules(entries, roots).items()):
        if _hashed(module):
            h.update(module.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


@functools.cache
def code_version(*entries: str) -> str:
    """``<package version>+<source hash>+<library hash>`` of what the entry modules run.

    Read once per process, so a source edit while a stage runs cannot give it two keys."""
    libs = hashlib.sha256(repr(sorted(library_versions().items())).encode()).hexdigest()[:8]
    return f"{foresight_core.__version__}+{source_hash(entries, package_roots())}+{libs}"

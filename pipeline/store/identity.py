"""What identifies a result: digests of params, work items, files, weights and code.

Resumable work (shards, training checkpoints) is keyed by these digests. Code counts by its meaning, not
its bytes: :func:`code_digest` hashes the syntax tree of each module a computation imports, without
docstrings, so a comment, a docstring or a reformatting keeps finished work, while any change to what runs
gives a new key.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np


def fingerprint_of(obj: Any) -> str:
    """A short SHA-256 of a JSON-serialisable object (params, item keys, input hashes); NumPy arrays count
    by their values, bytes by their SHA-256, anything else JSON cannot write by its ``str``."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _json_default(obj: Any) -> Any:
    """JSON stand-in for the values :func:`fingerprint_of` meets in items and params."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, bytes):
        return hashlib.sha256(obj).hexdigest()
    return str(obj)


def items_digest(items: Sequence[Any]) -> str:
    """Digest of one shard's work items (:func:`item_identity` of each, in order)."""
    return fingerprint_of([item_identity(item) for item in items])


def item_identity(item: Any) -> Any:
    """What identifies one work item, as plain JSON values: a file (``Path``) by its name and content, a
    dataclass by its fields, containers element by element, NumPy values by their values, bytes by their
    SHA-256. Any other type is an error: its ``str`` might elide content or hold a memory address."""
    if item is None or isinstance(item, (str, bool, int, float)):
        return item
    if isinstance(item, Path):
        return {"file": item.name, "content": files_digest([item])}
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return {f.name: item_identity(getattr(item, f.name)) for f in dataclasses.fields(item)}
    if isinstance(item, dict):
        return {str(k): item_identity(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        return [item_identity(v) for v in item]
    if isinstance(item, np.ndarray):
        return item_identity(item.tolist())
    if isinstance(item, np.generic):
        return item.item()
    if isinstance(item, bytes):
        return {"sha256": hashlib.sha256(item).hexdigest()}
    raise TypeError(f"items_digest: no identity for a work item of type {type(item).__name__}; pass plain "
                    f"values, dataclasses, arrays, bytes or Paths")


def files_digest(paths: Iterable[Path], relative_to: Path | None = None, full_hash_limit: int = 256 << 20) -> str:
    """SHA-256 (16 hex digits) over files: each one's name (its path relative to ``relative_to`` when given,
    else the bare name, so a moved copy hashes the same) and its bytes; files above ``full_hash_limit``
    bytes (model weights) count by size and modification time instead of content."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        name = path.relative_to(relative_to).as_posix() if relative_to is not None else path.name
        h.update(name.encode() + b"\0")
        stat = path.stat()
        if stat.st_size <= full_hash_limit:
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def dir_files(path: Path) -> list[Path]:
    """Regular files under ``path`` (a file itself when ``path`` is one; [] when missing)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []


def state_dict_hash(module: Any) -> str:
    """SHA-256 over a torch module's parameters and buffers (names, shapes, dtypes, bytes)."""
    import torch

    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)} {t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --- code ------------------------------------------------------------------------------------------

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PACKAGE = PACKAGE_DIR.name


def module_file(module: str) -> Path | None:
    """The source file of ``module`` ("pipeline.text", "pipeline.zoo") inside this package, else None."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str | None:
    """``pipeline.x.y`` for a file of this package (``pipeline.zoo`` for its ``__init__.py``), else None."""
    try:
        rel = path.resolve().relative_to(PACKAGE_DIR).with_suffix("")
    except ValueError:
        return None
    parts = [PACKAGE, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: Path) -> set[str]:
    """Every module name an ``import`` statement of ``path`` may load (top-level and inside functions),
    with the parent packages Python runs first; ``from m import x`` also names ``m.x`` in case x is a
    submodule."""
    import ast

    name = _module_name(path) or ""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    parents = {".".join(m.split(".")[:k]) for m in found for k in range(1, m.count(".") + 1)}
    return found | parents


def import_closure(*roots: str | Path) -> list[Path]:
    """Source files of this package that ``roots`` import, directly or through each other (static).

    Args:
        roots: module names ("pipeline.training") or paths of Python files (a stage script).
    Returns:
        Sorted paths: the roots that lie in this package and every package file they may import.
    """
    todo = [Path(r) if isinstance(r, Path) or str(r).endswith(".py") else module_file(str(r)) for r in roots]
    if any(t is None or not t.is_file() for t in todo):
        raise ValueError(f"import_closure: {roots} must be modules of {PACKAGE} or existing .py files")
    seen: set[Path] = set()
    while todo:
        path = todo.pop().resolve()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for f in map(module_file, _imported_modules(path)) if f is not None]
    return sorted(p for p in seen if _module_name(p) is not None)


def semantic_source(path: Path) -> str:
    """The syntax tree of a Python file without its docstrings, as text: equal for two files that differ
    only in comments, docstrings, blank lines or formatting; different when any statement, name or
    constant differs."""
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or ([] if isinstance(node, ast.Module) else [ast.Pass()])
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def code_digest(*roots: str | Path) -> str:
    """SHA-256 (16 hex digits) of the code that computes a result: :func:`semantic_source` of each file of
    :func:`import_closure`, with its path in the package.

    Part of every shard and checkpoint fingerprint. DVC reruns a stage when any byte of its code changes,
    but its resumable outputs are kept when the change does not touch what runs (a comment, a docstring):
    a rerun then resumes. Only the modules the work imports count, so editing an unrelated module keeps a
    half-finished training run's checkpoints.
    """
    h = hashlib.sha256()
    for path in import_closure(*roots):
        h.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        h.update(semantic_source(path).encode() + b"\0")
    return h.hexdigest()[:16]

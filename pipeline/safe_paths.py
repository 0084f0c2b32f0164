"""Paths named inside input files (a mapping file's ``image_path``, a metadata line's mask path) confined to
the folder they are relative to, so that a hostile or damaged input cannot make a stage read or write
anywhere else."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from pipeline.config import InputDataError

# Why a path is refused (``UnsafePathError.rule``), each with the sentence an error message gives.
PATH_RULES = {
    "empty_name": "the name is empty, names the folder itself or holds a NUL byte",
    "absolute_path": "absolute paths are not allowed; give the path relative to the folder",
    "parent_escape": "'..' components may not lead out of the folder",
    "symlink_escape": "a symbolic link on the path points out of the folder",
}


class UnsafePathError(InputDataError):
    """A path read from an input file would leave the folder it must stay in; ``rule`` is a key of
    :data:`PATH_RULES`."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


def inside(root: str | Path, relative: str, what: str = "path") -> Path:
    """``root / relative`` with symbolic links resolved, when it stays strictly inside ``root`` (resolved).

    ``what`` names the entry the path comes from, for the error. Absolute paths, empty names and ``..``
    escapes are refused before the file system is touched; a symbolic link (inside ``root``) that points
    out of it is refused after resolution. The path need not exist. Raises :class:`UnsafePathError`
    naming the entry, the folder and the rule broken.
    """
    text = str(relative)
    if not text or "\0" in text:
        _refuse(what, text, root, "empty_name")
    if PurePosixPath(text).is_absolute() or Path(text).is_absolute():
        _refuse(what, text, root, "absolute_path")
    lexical = os.path.normpath(text)
    if lexical in (".", "") or lexical == ".." or lexical.startswith(".." + os.sep):
        _refuse(what, text, root, "empty_name" if lexical in (".", "") else "parent_escape")
    base = Path(root).resolve()
    target = (base / text).resolve()
    if target == base or base not in target.parents:
        _refuse(what, text, root, "symlink_escape" if target != base else "empty_name")
    return target


def _refuse(what: str, relative: str, root: str | Path, rule: str) -> None:
    """Raise the :class:`UnsafePathError` of ``rule`` for ``relative`` under ``root``."""
    raise UnsafePathError(f"{what}: path {relative!r} is refused ({rule}: {PATH_RULES[rule]}; it must stay "
                          f"inside {root}); fix the entry or remove it", rule)

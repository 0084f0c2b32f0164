"""Which stage instances rerun when a package module changes: the table in ``docs/caching.md``.

DVC reruns a stage instance (``sample@sd14``) when a file in its ``deps`` changes, so a module's cost of
change is the set of instances whose deps hold it. ``python -m pipeline.deps_table`` prints that table for
the repository's ``dvc.yaml`` and ``params.yaml`` (a test checks that the docs hold the current one).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

import yaml

REPO = Path(__file__).resolve().parents[1]


def stage_instances(dvc: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{instance name: its deps}``: ``name`` for a plain stage, ``name@key`` for each ``foreach`` key or item
    (a ``${params_key}`` foreach is read from ``params``)."""
    out = {}
    for name, stage in dvc["stages"].items():
        body = stage.get("do", stage)
        deps = [str(d) for d in body.get("deps", [])]
        each = stage.get("foreach")
        if each is None:
            out[name] = deps
            continue
        if isinstance(each, str):
            each = params[each.strip("${} ")]
        for key in each:
            out[f"{name}@{key}"] = deps
    return out


def package_modules(root: Path = REPO) -> list[str]:
    """Every Python file of ``pipeline/``, as a repository-relative path."""
    return sorted(p.relative_to(root).as_posix() for p in (root / "pipeline").rglob("*.py")
                  if "__pycache__" not in p.parts)


def rerun_by_module(dvc: Mapping[str, Any], params: Mapping[str, Any], modules: list[str]) -> dict[str, list[str]]:
    """``{module: instances whose deps contain it}`` (a dependency on a folder contains its files)."""
    instances = stage_instances(dvc, params)
    table = {}
    for module in modules:
        table[module] = [name for name, deps in instances.items()
                         if any(module == d or module.startswith(d.rstrip("/") + "/") for d in deps)]
    return table


def markdown(table: Mapping[str, list[str]], total: int) -> str:
    """The table as Markdown: module, how many of ``total`` instances rerun, which (grouped by stage)."""
    lines = ["| module | instances that rerun | which |", "|---|---|---|"]
    for module, names in table.items():
        which = "all" if len(names) == total else _grouped(names)
        lines.append(f"| `{module}` | {len(names)} of {total} | {which} |")
    return "\n".join(lines) + "\n"


def _grouped(names: list[str]) -> str:
    """``sample@{sd14,trained}, train``: instances of one stage on one entry."""
    groups: dict[str, list[str]] = {}
    for name in names:
        stage, _, key = name.partition("@")
        groups.setdefault(stage, []).append(key)
    return ", ".join(s if keys == [""] else f"{s}@{{{','.join(keys)}}}" for s, keys in groups.items()) or "none"


def current_table(root: Path = REPO) -> str:
    """The Markdown table of the repository as it is."""
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    table = rerun_by_module(dvc, params, package_modules(root))
    return markdown(table, len(stage_instances(dvc, params)))


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m pipeline.deps_table", description=__doc__).parse_args(argv)
    print(current_table(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

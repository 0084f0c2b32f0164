"""``--help`` of a stage script: its docstring, then what ``dvc.yaml`` declares for its stage (params read,
inputs, outputs), so a user sees what a stage depends on without reading ``dvc.yaml``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

PARAMS_FILE = "params.yaml"


def help_action(script: Path, placeholder: str | None) -> type:
    """The argparse action of ``--help``: the usage and docstring, then :func:`declared_io` (``dvc.yaml`` is
    read only when help is asked for)."""
    import argparse

    class StageHelp(argparse.Action):
        def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
            super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

        def __call__(self, parser, namespace, values, option_string=None):
            parser.epilog = declared_io(script, placeholder)
            parser.print_help()
            parser.exit()

    return StageHelp


DVC_FILE = "dvc.yaml"
HELP_WIDTH = 100


def declared_io(script: str | Path, placeholder: str | None = None) -> str:
    """What ``dvc.yaml`` beside the repository root of ``script`` (``<root>/stages/<name>.py``) declares for
    the stage that runs it: ``Params read (dvc.yaml): ...``, ``Inputs: ...`` (its non-code deps) and
    ``Outputs: ...`` (outs, metrics, plots). ``${profile}`` reads ``<profile>``; a foreach stage's
    ``${key}``/``${item}`` read ``<placeholder>``. Empty when there is no such file or stage; a file that
    does not parse gives one line saying so (help never fails because of it)."""
    path = Path(script).resolve().parent.parent / DVC_FILE
    if not path.is_file():
        return ""
    try:
        import yaml

        stages = yaml.safe_load(path.read_text())["stages"]
        found = _stage_of(stages, Path(script).stem)
        return _io_text(*found, placeholder or "KEY", path.parent) if found else ""
    except Exception as err:  # noqa: BLE001 - help must print whatever dvc.yaml holds
        return f"({path}: could not read the stage's params: {type(err).__name__}: {err})"


def _stage_of(stages: dict[str, Any], module: str) -> tuple[str, dict[str, Any]] | None:
    """(name, stage) of the ``dvc.yaml`` stage whose command runs ``-m stages.<module>``."""
    for stage_name, stage in stages.items():
        if re.search(rf"-m stages\.{module}(\s|$)", str(stage.get("do", stage).get("cmd", ""))):
            return stage_name, stage
    return None


def _io_text(stage_name: str, stage: dict[str, Any], placeholder: str, root: Path) -> str:
    """The help lines of one ``dvc.yaml`` stage (see :func:`declared_io`)."""
    import textwrap

    body, each = stage.get("do", stage), stage.get("foreach")
    title = f"Stage (dvc.yaml): {stage_name}"
    if each is not None:
        title += f"@<{placeholder}>, <{placeholder}> one of: {', '.join(_foreach_keys(each, root))}"
    fields = {
        "Params read (dvc.yaml)": [_entry(e) for e in body.get("params", [])],
        "Inputs": [_entry(d) for d in body.get("deps", []) if not str(d).startswith(("stages/", "pipeline/"))],
        "Outputs": [_entry(e) for kind in ("outs", "metrics", "plots") for e in body.get(kind, [])],
    }
    lines = [title] + [f"{label}: {', '.join(_render(v, each, placeholder) for v in values) or '(none)'}"
                       for label, values in fields.items()]
    return "\n".join(textwrap.fill(line, HELP_WIDTH, subsequent_indent="  ", break_long_words=False,
                                   break_on_hyphens=False) for line in lines)


def _entry(entry: Any) -> str:
    """A ``dvc.yaml`` list entry as text: a path or key, or the path of ``{path: options}``."""
    if isinstance(entry, dict):
        return ", ".join(str(k) if not isinstance(v, list) else f"{k}: {', '.join(map(str, v))}"
                         for k, v in entry.items())
    return str(entry)


def _foreach_keys(each: Any, root: Path) -> list[str]:
    """The keys of a foreach stage: a mapping's keys, a list's items, or the keys of the params mapping a
    ``${name}`` names (read from params.yaml beside dvc.yaml; ``[name]`` when it cannot be read)."""
    if isinstance(each, (dict, list)):
        return [str(k) for k in each]
    import yaml

    name = str(each).strip().removeprefix("${").removesuffix("}")
    try:
        return [str(k) for k in yaml.safe_load((root / PARAMS_FILE).read_text())[name]]
    except Exception:  # noqa: BLE001 - help shows the reference instead
        return [f"the keys of {name} in {PARAMS_FILE}"]


def _render(text: str, each: Any, placeholder: str) -> str:
    """``text`` with dvc.yaml's ``${...}`` written for a reader: ``${profile}`` -> ``<profile>``,
    ``${key}``/``${item}`` -> ``<KEY>``, ``${item.field}`` -> the field of the foreach entry (the params key it
    comes from, or its value per key)."""
    def one(match: re.Match) -> str:
        ref = match.group(1).strip()
        if ref in ("key", "item"):
            return f"<{placeholder}>"
        if ref.startswith("item."):
            return _item_field(each, ref.removeprefix("item."), placeholder)
        return f"<{ref}>"

    return re.sub(r"\$\{([^}]*)\}", one, text)


def _item_field(each: Any, name: str, placeholder: str) -> str:
    """``${item.<name>}`` of a foreach stage: ``<params.<KEY>.<name>>`` for a params mapping, else the values
    of the foreach mapping by key (``artifacts/models (base) or artifacts/train/unet (trained)``)."""
    if isinstance(each, dict):
        return " or ".join(f"{entry.get(name, '?') if isinstance(entry, dict) else '?'} ({key})"
                           for key, entry in each.items())
    source = str(each).strip().removeprefix("${").removesuffix("}")
    return f"<{source}.{placeholder}.{name}>"

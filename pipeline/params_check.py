"""Which keys of ``params.yaml`` some stage reads: a misspelt section (``los:``) is an error, not a value that
is silently ignored.

The known keys come from ``dvc.yaml`` itself (the ``params`` each stage declares and the ``${...}`` values its
commands, paths and ``foreach`` use), so adding a section to a stage is all it takes to make it known. The
``check_params`` stage runs this whenever ``params.yaml`` changes, also when no stage's own params changed (a
new, misspelt key changes none of them).
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Mapping

from pipeline.config import ConfigError

PROFILE_PREFIX = "profiles.${profile}."
INTERPOLATION = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*\}")
LOOP_NAMES = {"key", "item"}  # foreach variables, not params


def declared_keys(dvc: Mapping[str, Any], dvc_text: str) -> tuple[set[str], set[str]]:
    """(top-level keys, keys of a profile) that ``dvc.yaml`` reads: from its stages' ``params`` lists and every
    ``${name}`` interpolation in its text."""
    top, profile = {"profiles"}, set()
    for stage in dvc.get("stages", {}).values():
        for entry in stage.get("do", stage).get("params", []):
            for key in (entry if isinstance(entry, dict) else {entry: None}):
                _add(str(key), top, profile)
    for name in INTERPOLATION.findall(dvc_text):
        if name.split(".")[0] not in LOOP_NAMES:
            _add(name, top, profile)
    return top, profile


def _add(dotted: str, top: set[str], profile: set[str]) -> None:
    """Record a declared params key (``loss``, ``sampling.scheduler``, ``profiles.${profile}.train``)."""
    if dotted.startswith(PROFILE_PREFIX):
        profile.add(dotted[len(PROFILE_PREFIX):].split(".")[0])
    else:
        top.add(dotted.split(".")[0])


def unknown_keys(params: Mapping[str, Any], top: Iterable[str], profile: Iterable[str]) -> list[str]:
    """Messages for the keys of ``params`` (top level and each profile's) that no stage reads, each with the
    closest known spelling."""
    top, profile = sorted(top), sorted(profile)
    problems = [_message(key, top, "") for key in params if key not in top]
    for name, prof in (params.get("profiles") or {}).items():
        if isinstance(prof, Mapping):
            problems += [_message(key, profile, f"profiles.{name}.") for key in prof if key not in profile]
    return problems


def _message(key: Any, known: list[str], where: str) -> str:
    """``profiles.demo.trian: no stage reads it; did you mean 'train'?``"""
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    return f"{where}{key}: no stage reads this key (dvc.yaml); {hint}"


def check_known_keys(params: Mapping[str, Any], dvc: Mapping[str, Any], dvc_text: str) -> int:
    """Raise :class:`ConfigError` listing every key of ``params`` no stage reads; returns how many top-level
    and profile keys were checked."""
    top, profile = declared_keys(dvc, dvc_text)
    problems = unknown_keys(params, top, profile)
    if problems:
        raise ConfigError("params.yaml: " + "; ".join(problems))
    return len(params) + sum(len(p) for p in (params.get("profiles") or {}).values() if isinstance(p, Mapping))


def check_checkpoint_steps(params: Mapping[str, Any]) -> list[int]:
    """The ``checkpoint_steps`` of params, checked against the active profile's training: each a positive
    integer the run saves (a multiple of ``train.checkpoint_every``, or ``max_steps``) and at most
    ``max_steps``; raise :class:`ConfigError` naming the bad steps and the ones that would do. Checked here, at
    the start of a run, rather than after hours of training in stage ``checkpoint@<N>``."""
    steps = params.get("checkpoint_steps") or []
    train = (params.get("profiles", {}).get(params.get("profile"), {}) or {}).get("train", {}) or {}
    every, last = train.get("checkpoint_every"), train.get("max_steps")
    if not isinstance(steps, list):
        raise ConfigError(f"checkpoint_steps must be a list of training steps, got {steps!r}")
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s <= 0
           or (isinstance(last, int) and s > last)
           or (isinstance(every, int) and every > 0 and s % every and s != last)]
    if bad:
        regular = isinstance(every, int) and isinstance(last, int) and every > 0
        saved = list(range(every, last + 1, every)) if regular else []
        shown = ", ".join(map(str, saved[:6])) + (", ..." if len(saved) > 6 else "")
        raise ConfigError(f"checkpoint_steps {bad} are not steps the {params.get('profile')} profile's training saves "
                          f"(checkpoint_every {every}, max_steps {last}: {shown}); set e.g. "
                          f"-S 'checkpoint_steps=[{', '.join(map(str, saved[:2]))}]' or [] for none")
    return steps

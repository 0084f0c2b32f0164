"""One model in two revisions (commits, branches, DVC experiments), compared with paired-bootstrap intervals.

``dvc metrics diff`` shows how far MG_k moved between a baseline and an ablation, not whether the move is
beyond the noise. This command reads, at both revisions, the per-unit tables the ``compare`` stage
resamples (``artifacts/multigen_images/<model>.csv``, ``artifacts/visor_images/<model>.csv``,
``plots/piebench/<model>.csv``, ``plots/clip_score/<model>.csv``) and puts the same paired bootstrap
(:mod:`.pairs`) on them::

    dvc exp run -S loss.pixel_weight=1e-4 -n pixel-1e-4
    python -m pipeline.compare.revisions main pixel-1e-4              # trained at main against the experiment
    python -m pipeline.compare.revisions HEAD~1 workspace --model step_8000 --json diff.json

Differences are ``B - A``, as in ``dvc metrics diff A B``. The units must be the same in both revisions: a
family whose input data differ (the MultiGen prompt files, the PIE-Bench images, the FID captions, by their
hash in ``dvc.lock``) or whose table is missing at either revision is skipped, with the reason printed;
MultiGen also refuses grids of other prompts or image counts. FID (``metrics/fid/<model>.json``) is shown
beside them without an interval, when both revisions share the reference statistics. Params that differ are
listed first: with another ``seed`` the images are still paired by prompt, but not by noise, so intervals
are wider.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import pandas as pd
import yaml

from pipeline.compare.pairs import CompareCfg, compare_clip, compare_multigen, compare_piebench, compare_visor
from pipeline.config import ConfigError, InputDataError, MissingInputError, StageError
from pipeline.names import PIEBENCH_KEYS

WORKSPACE = "workspace"
Reader = Callable[[str, str], "str | None"]  # (path, revision) -> the file's text, or None when absent
Tables = dict[str, pd.DataFrame]  # "A" and "B" -> the per-unit table of the model at that revision


def _multigen(tables: Tables, order: list[str], cfg: CompareCfg) -> dict[str, Any]:
    return compare_multigen(tables, order, list(dict.fromkeys(tables["A"]["prompt_set"])), cfg)


def _visor(tables: Tables, order: list[str], cfg: CompareCfg) -> dict[str, Any]:
    images_per_prompt = int(tables["A"]["image_index"].max()) + 1 if len(tables["A"]) else 0
    return compare_visor(tables, order, images_per_prompt, cfg)


def _piebench(tables: Tables, order: list[str], cfg: CompareCfg) -> dict[str, Any]:
    return compare_piebench(tables, order, PIEBENCH_KEYS, cfg)


def _clip(tables: Tables, order: list[str], cfg: CompareCfg) -> dict[str, Any]:
    return compare_clip(tables, order, list(dict.fromkeys(tables["A"]["reference"])), cfg)


@dataclass(frozen=True)
class Family:
    """A group of scores compared on one kind of unit: its per-unit table, the stage output that defines the
    units, the stage family that writes the table, and the comparison of :mod:`.pairs` that scores it."""

    name: str
    table: str         # per-unit table of a model, with ``{model}``
    units: str | None  # output whose hash in dvc.lock must agree between the revisions (None: params only)
    writer: str
    compare: Callable[[Tables, list[str], CompareCfg], dict[str, Any]]


FAMILIES = (
    Family("multigen", "artifacts/multigen_images/{model}.csv", "artifacts/data/multigen", "score", _multigen),
    Family("visor", "artifacts/visor_images/{model}.csv", None, "visor", _visor),  # SR2D prompts: params
    Family("piebench", "plots/piebench/{model}.csv", "artifacts/data/piebench", "piebench", _piebench),
    Family("clip_score", "plots/clip_score/{model}.csv", "artifacts/data/fid/captions", "fid", _clip),
)


def dvc_reader(path: str, rev: str) -> str | None:
    """The text of ``path`` at ``rev`` (a Git revision or experiment name; ``workspace`` for the working
    tree), through ``dvc.api.read``, which also reads DVC-tracked outputs from the cache; None when the
    revision has no such file."""
    import dvc.api
    from dvc.exceptions import DvcException, PathMissingError
    from dvc.scm import RevError

    try:
        return dvc.api.read(path, rev=None if rev == WORKSPACE else rev)
    except (FileNotFoundError, PathMissingError):
        return None
    except RevError as err:
        raise ConfigError(f"{rev!r} is neither a Git revision nor a DVC experiment (`dvc exp list` lists the "
                          f"experiments; '{WORKSPACE}' is the working tree): {err}") from err
    except DvcException as err:  # e.g. an output of that revision that is not in this DVC cache
        raise MissingInputError(f"{path} at {rev} cannot be read: {err} (`dvc pull` or `dvc exp pull` it "
                                f"first)") from err


def output_hashes(lock_text: str | None) -> dict[str, str]:
    """``{path: md5}`` of every stage output recorded in a ``dvc.lock`` text (empty when there is none)."""
    lock = yaml.safe_load(lock_text) if lock_text else None
    hashes = {}
    for stage in ((lock or {}).get("stages") or {}).values():
        for out in stage.get("outs") or []:
            hashes[out["path"]] = out.get("md5", "")
    return hashes


def flat_params(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` for every leaf of a params mapping (lists are leaves)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flat_params(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def params_changes(text_a: str | None, text_b: str | None) -> list[tuple[str, Any, Any]]:
    """``(key, value at A, value at B)`` for every params leaf that differs (``None`` where one lacks it)."""
    a = flat_params(yaml.safe_load(text_a) or {}) if text_a else {}
    b = flat_params(yaml.safe_load(text_b) or {}) if text_b else {}
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def missing_table(path: str, rev: str, writer: str, model: str) -> str:
    """Why a per-model table is absent at a revision: its stage did not run there, or the revision predates
    the table."""
    stage = f"{writer}_step@{model.removeprefix('step_')}" if model.startswith("step_") else f"{writer}@{model}"
    return (f"{path} is not in {rev} (stage {stage} did not run there, or {rev} predates that table; "
            f"`dvc repro {stage}` at that revision writes it)")


def family_tables(family: Family, model_a: str, model_b: str, rev_a: str, rev_b: str, hashes: tuple[dict, dict],
                  read: Reader) -> tuple[Tables | None, str]:
    """``({"A": table, "B": table}, "")``, or ``(None, reason)`` when the family cannot be compared: its
    units differ between the revisions or a table is missing."""
    units_a, units_b = (h.get(family.units) if family.units else None for h in hashes)
    if units_a != units_b:
        return None, (f"{family.units} differs between {rev_a} and {rev_b} ({units_a} against {units_b}): the "
                      f"two runs were not scored on the same units")
    tables = {}
    for label, model, rev in (("A", model_a, rev_a), ("B", model_b, rev_b)):
        path = family.table.format(model=model)
        try:
            text = read(path, rev)
        except MissingInputError as err:
            return None, str(err)
        if text is None:
            return None, missing_table(path, rev, family.writer, model)
        tables[label] = pd.read_csv(io.StringIO(text), keep_default_na=True)
    return tables, ""


def compare_revisions(rev_a: str, rev_b: str, model_a: str, model_b: str, cfg: CompareCfg,
                      read: Reader = dvc_reader) -> dict[str, Any]:
    """The comparison of ``model_a`` at ``rev_a`` (A) with ``model_b`` at ``rev_b`` (B).

    Returns:
        ``{"a": {rev, model}, "b": {...}, "level", "reps", "seed", "params": [[key, A, B], ...],
        "multigen": {set: {"mg<k>": {"A": {value}, "B": {value}, "B-A": interval}}}, "visor": {score: {...}},
        "piebench": {metric: {...}}, "clip_score": {reference: {...}}, "fid": {reference: {A, B, B-A: {diff}}},
        "skipped": {family: reason}}``.
    """
    hashes = (output_hashes(read("dvc.lock", rev_a)), output_hashes(read("dvc.lock", rev_b)))
    result: dict[str, Any] = {
        "a": {"rev": rev_a, "model": model_a}, "b": {"rev": rev_b, "model": model_b},
        "level": cfg.level, "reps": cfg.reps, "seed": cfg.seed,
        "params": [list(c) for c in params_changes(read("params.yaml", rev_a), read("params.yaml", rev_b))],
        "skipped": {}}
    for family in FAMILIES:
        tables, reason = family_tables(family, model_a, model_b, rev_a, rev_b, hashes, read)
        if tables is None:
            result["skipped"][family.name] = reason
            continue
        try:
            result[family.name] = family.compare(tables, ["A", "B"], cfg)
        except InputDataError as err:
            result["skipped"][family.name] = str(err)
    fid, reason = fid_differences(model_a, model_b, rev_a, rev_b, hashes, read)
    if fid is None:
        result["skipped"]["fid"] = reason
    else:
        result["fid"] = fid
    return result


def fid_differences(model_a: str, model_b: str, rev_a: str, rev_b: str, hashes: tuple[dict, dict],
                    read: Reader) -> tuple[dict[str, Any] | None, str]:
    """``({reference set: {"A": {value}, "B": {value}, "B-A": {diff}}}, "")`` from ``metrics/fid/<model>.json``
    of both revisions (FID has no interval: docs/comparisons.md), or ``(None, reason)`` when the reference
    statistics or captions differ between the revisions or a metrics file is missing."""
    for path in ("artifacts/fid/reference", "artifacts/data/fid/captions"):
        if hashes[0].get(path) != hashes[1].get(path):
            return None, f"{path} differs between {rev_a} and {rev_b}: the FIDs are not against the same reference"
    values = []
    for model, rev in ((model_a, rev_a), (model_b, rev_b)):
        path = f"metrics/fid/{model}.json"
        try:
            text = read(path, rev)
        except MissingInputError as err:
            return None, str(err)
        if text is None:
            return None, missing_table(path, rev, "fid", model)
        values.append(json.loads(text))
    sets = [name for name, entry in values[0].items() if isinstance(entry, dict) and "fid" in entry]
    return {name: {"A": {"value": values[0][name]["fid"]}, "B": {"value": values[1][name]["fid"]},
                   "B-A": {"diff": values[1][name]["fid"] - values[0][name]["fid"]}}
            for name in sets if name in values[1]}, ""


def _number(value: float | None) -> str:
    return "—" if value is None or value != value else f"{value:.2f}"


def comparison_rows(result: Mapping[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(score, A, B, B − A, interval, ✱ when the interval excludes 0) for every compared score."""
    scores = [(f"MultiGen {name} {level.upper()}", pair) for name, levels in (result.get("multigen") or {}).items()
              for level, pair in levels.items()]
    scores += [(f"VISOR {name}", pair) for name, pair in (result.get("visor") or {}).items()]
    scores += [(f"PIE-Bench {metric}", pair) for metric, pair in (result.get("piebench") or {}).items()]
    scores += [(f"CLIP score {name}", pair) for name, pair in (result.get("clip_score") or {}).items()]
    scores += [(f"FID {name}", pair) for name, pair in (result.get("fid") or {}).items()]
    rows = []
    for label, pair in scores:
        diff = pair["B-A"]
        interval = f"[{_number(diff['low'])}, {_number(diff['high'])}]" if "low" in diff else "none (FID)"
        rows.append((label, _number(pair["A"]["value"]), _number(pair["B"]["value"]),
                     "—" if diff["diff"] != diff["diff"] else f"{diff['diff']:+.2f}", interval,
                     "✱" if diff.get("significant") else ""))
    return rows


def markdown(result: Mapping[str, Any]) -> str:
    """The comparison as Markdown: the params that differ, a table of scores, the skipped families."""
    a, b = result["a"], result["b"]
    lines = [f"A: {a['model']} at {a['rev']}; B: {b['model']} at {b['rev']}; "
             f"{100 * result['level']:.0f}% paired-bootstrap intervals of B − A ({result['reps']} replicates, "
             f"seed {result['seed']}); ✱: the interval excludes 0.", ""]
    if result["params"]:
        lines += ["Params that differ:", ""] + [f"- `{k}`: {va!r} → {vb!r}" for k, va, vb in result["params"]]
    else:
        lines.append("The params are the same in both revisions.")
    lines += ["", "| Score | A | B | B − A | Interval | |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(result)]
    for family, reason in result["skipped"].items():
        lines += ["", f"Skipped {family}: {reason}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare.revisions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev_a", help="baseline: a Git revision, a DVC experiment name, or 'workspace'")
    parser.add_argument("rev_b", help="the other revision, experiment or 'workspace'")
    parser.add_argument("--model", default="trained", help="model key at A (default: trained)")
    parser.add_argument("--model-b", default=None, help="model key at B (default: the same as --model)")
    defaults = CompareCfg()
    parser.add_argument("--reps", type=int, default=defaults.reps, help=f"replicates (default {defaults.reps})")
    parser.add_argument("--level", type=float, default=defaults.level, help=f"coverage (default {defaults.level})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the resampling (default 0)")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    if args.reps < 1 or not 0 < args.level < 1:
        parser.error("--reps must be at least 1 and --level lie in (0, 1)")
    cfg = CompareCfg(reps=args.reps, level=args.level, seed=args.seed)
    try:
        result = compare_revisions(args.rev_a, args.rev_b, args.model, args.model_b or args.model, cfg)
    except StageError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    sys.stdout.write(markdown(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1, sort_keys=True)
            handle.write("\n")
    return 0 if len(result["skipped"]) < len(FAMILIES) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""One model in two revisions (pipeline.compare.revisions): values and intervals against hand computations and
the bootstrap, skipped families with their reasons, and a real `dvc exp run` experiment read by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.compare.bootstrap import paired_interval
from pipeline.compare.pairs import CompareCfg
from pipeline.compare.revisions import (compare_revisions, comparison_rows, main, markdown, missing_table,
                                        output_hashes, params_changes)
from pipeline.names import PIEBENCH_KEYS

CFG = CompareCfg(reps=500, level=0.9, seed=3)


def _multigen(seed: int, prompts: int = 20, images: int = 3) -> pd.DataFrame:
    """A found-per-image table of one prompt set ``coco``: ``images`` seeded images per prompt."""
    rng = np.random.default_rng(seed)
    n = prompts * images
    return pd.DataFrame({"prompt_set": "coco", "prompt_id": np.repeat(np.arange(prompts), images),
                         "image_index": np.tile(np.arange(images), prompts), "found": rng.integers(0, 6, n),
                         "scored": (rng.random(n) > 0.1).astype(int)})


def _piebench(seed: int, images: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({"image_id": [f"{i:03d}" for i in range(images)], "status": "ok"})
    for metric in PIEBENCH_KEYS:
        table[metric] = rng.random(images)
    return table


def _clip(seed: int, captions: int = 15) -> pd.DataFrame:
    return pd.DataFrame({"reference": "coco", "prompt_id": np.arange(captions),
                         "clip_score": np.random.default_rng(seed).normal(25.0, 3.0, captions)})


def _visor(seed: int, prompts: int = 10, images: int = 4) -> pd.DataFrame:
    """An image-outcome table of the visor stage: random detections, right only where both are found."""
    rng = np.random.default_rng(seed)
    n = prompts * images
    a, b = rng.integers(0, 2, n), rng.integers(0, 2, n)
    return pd.DataFrame({"prompt_id": np.repeat(np.arange(prompts) * 7, images),
                         "image_index": np.tile(np.arange(images), prompts), "scored": 1, "found_a": a,
                         "found_b": b, "right": a * b * rng.integers(0, 2, n)})


def _lock(**units: str) -> str:
    """A dvc.lock text whose producing stages record the given unit-defining outputs' hashes."""
    paths = {"multigen": "artifacts/data/multigen", "piebench": "artifacts/data/piebench",
             "captions": "artifacts/data/fid/captions", "reference": "artifacts/fid/reference"}
    return yaml.safe_dump({"schema": "2.0", "stages": {
        name: {"outs": [{"path": paths[name], "md5": units.get(name, f"{name}.dir")}]} for name in paths}})


class _Revisions:
    """A reader over in-memory revisions: ``files[rev][path]`` is the text, absent paths give None."""

    def __init__(self, files: dict[str, dict[str, str]]):
        self.files = files

    def __call__(self, path: str, rev: str) -> str | None:
        return self.files[rev].get(path)


def _revision(model: str, seed: int, lock: str, params: str) -> dict[str, str]:
    return {"dvc.lock": lock, "params.yaml": params,
            f"artifacts/multigen_images/{model}.csv": _multigen(seed).to_csv(index=False),
            f"plots/piebench/{model}.csv": _piebench(seed).to_csv(index=False),
            f"artifacts/visor_images/{model}.csv": _visor(seed).to_csv(index=False),
            f"plots/clip_score/{model}.csv": _clip(seed).to_csv(index=False),
            f"metrics/fid/{model}.json": json.dumps({"coco": {"fid": 20.0 + seed}, "extractor": "x"})}


def _mg_units(table: pd.DataFrame, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt (100 x hits, scored images), computed here with NumPy only."""
    hit = 100.0 * ((table["found"].to_numpy() >= level) & (table["scored"].to_numpy() == 1))
    prompts = table["prompt_id"].to_numpy()
    return (np.bincount(prompts, weights=hit), np.bincount(prompts, weights=table["scored"].to_numpy()))


def test_values_and_intervals_equal_hand_computations_and_the_bootstrap():
    read = _Revisions({"main": _revision("trained", 1, _lock(), "loss: {pixel_weight: 5.0e-5}\n"),
                       "exp": _revision("trained", 2, _lock(), "loss: {pixel_weight: 1.0e-4}\n")})
    result = compare_revisions("main", "exp", "trained", "trained", CFG, read)
    assert result["skipped"] == {}
    assert result["params"] == [["loss.pixel_weight", 5e-5, 1e-4]]
    for level in (1, 3, 5):
        (num_a, den_a), (num_b, den_b) = _mg_units(_multigen(1), level), _mg_units(_multigen(2), level)
        pair = result["multigen"]["coco"][f"mg{level}"]
        assert pair["A"]["value"] == pytest.approx(num_a.sum() / den_a.sum())
        assert pair["B"]["value"] == pytest.approx(num_b.sum() / den_b.sum())
        expected = paired_interval(num_b, den_b, num_a, den_a, reps=CFG.reps, level=CFG.level, seed=CFG.seed)
        got = pair["B-A"]
        assert (got["diff"], got["low"], got["high"]) == pytest.approx((expected.diff, expected.low, expected.high))
    psnr_a, psnr_b = _piebench(1)["psnr_unedit_part"], _piebench(2)["psnr_unedit_part"]
    assert result["piebench"]["psnr_unedit_part"]["B-A"]["diff"] == pytest.approx(psnr_b.mean() - psnr_a.mean())
    clip = result["clip_score"]["coco"]["B-A"]
    assert clip["diff"] == pytest.approx(_clip(2)["clip_score"].mean() - _clip(1)["clip_score"].mean())
    assert clip["low"] <= clip["diff"] <= clip["high"]
    assert result["fid"] == {"coco": {"A": {"value": 21.0}, "B": {"value": 22.0}, "B-A": {"diff": 1.0}}}
    rows = comparison_rows(result)
    assert [r[0] for r in rows[:5]] == [f"MultiGen coco MG{k}" for k in range(1, 6)]
    oa_a, oa_b = (100 * (t["found_a"] * t["found_b"]).mean() for t in (_visor(1), _visor(2)))
    assert result["visor"]["oa"]["B-A"]["diff"] == pytest.approx(oa_b - oa_a)
    assert list(result["visor"]) == ["oa", "oa_a", "oa_b", "visor_uncond", "visor_cond"] + [
        f"visor_{k}" for k in range(1, 5)]
    assert len(rows) == 5 + 9 + len(PIEBENCH_KEYS) + 2
    assert rows[-1] == ("FID coco", "21.00", "22.00", "+1.00", "none (FID)", "")
    mg1 = result["multigen"]["coco"]["mg1"]
    assert rows[0] == ("MultiGen coco MG1", f"{mg1['A']['value']:.2f}", f"{mg1['B']['value']:.2f}",
                       f"{mg1['B-A']['diff']:+.2f}", f"[{mg1['B-A']['low']:.2f}, {mg1['B-A']['high']:.2f}]",
                       "✱" if mg1["B-A"]["significant"] else "")
    text = markdown(result)
    assert "`loss.pixel_weight`: 5e-05 → 0.0001" in text and "| MultiGen coco MG1 |" in text


def test_same_revision_gives_zero_differences():
    read = _Revisions({"main": _revision("trained", 1, _lock(), "seed: 0\n")})
    result = compare_revisions("main", "main", "trained", "trained", CFG, read)
    diffs = [p["B-A"] for p in result["multigen"]["coco"].values()] + [result["clip_score"]["coco"]["B-A"]]
    assert all(d["diff"] == 0 and d["low"] == 0 == d["high"] and not d["significant"] for d in diffs)
    assert "The params are the same in both revisions." in markdown(result)


def test_families_with_other_units_or_missing_tables_are_skipped_with_the_reason():
    other = _revision("trained", 2, _lock(piebench="other.dir", reference="other.dir"), "seed: 0\n")
    del other["plots/clip_score/trained.csv"]
    read = _Revisions({"main": _revision("trained", 1, _lock(), "seed: 0\n"), "exp": other})
    result = compare_revisions("main", "exp", "trained", "trained", CFG, read)
    assert set(result["skipped"]) == {"piebench", "clip_score", "fid"} and "coco" in result["multigen"]
    assert result["skipped"]["fid"].startswith("artifacts/fid/reference differs between main and exp")
    assert "artifacts/data/piebench differs between main and exp (piebench.dir against other.dir)" in \
        result["skipped"]["piebench"]
    assert result["skipped"]["clip_score"].startswith(
        "plots/clip_score/trained.csv is not in exp (stage fid@trained did not run there, or exp predates")
    assert "Skipped piebench: artifacts/data/piebench differs" in markdown(result)


def test_multigen_grids_of_other_sampling_settings_are_refused():
    other = _revision("trained", 2, _lock(), "seed: 0\n")
    other["artifacts/multigen_images/trained.csv"] = _multigen(2, images=2).to_csv(index=False)
    read = _Revisions({"main": _revision("trained", 1, _lock(), "seed: 0\n"), "exp": other})
    result = compare_revisions("main", "exp", "trained", "trained", CFG, read)
    assert "different coco prompts or images" in result["skipped"]["multigen"]
    assert "piebench" in result and "multigen" not in result


def test_two_models_of_one_revision_and_the_helpers():
    files = _revision("sd14", 1, _lock(), "seed: 0\n")
    files.update({k.replace("sd14", "trained"): v for k, v in _revision("sd14", 4, _lock(), "").items()
                  if "sd14" in k})
    result = compare_revisions("main", "main", "sd14", "trained", CFG, _Revisions({"main": files}))
    assert result["a"] == {"rev": "main", "model": "sd14"} and result["b"] == {"rev": "main", "model": "trained"}
    assert result["multigen"]["coco"]["mg2"]["B-A"]["diff"] != 0
    assert "stage visor_step@20 did not run" in missing_table("t.csv", "HEAD~4", "visor", "step_20")
    assert output_hashes(None) == {} and output_hashes(_lock(multigen="x.dir"))["artifacts/data/multigen"] == "x.dir"
    assert params_changes("a: {b: [1, 2]}\nc: 1\n", "a: {b: [1, 3]}\n") == [("a.b", [1, 2], [1, 3]), ("c", 1, None)]


# --- a real DVC project ------------------------------------------------------------------------------------

MAKE_TABLES = """
import sys
import numpy as np, pandas as pd, yaml
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_compare_revisions import _clip, _multigen, _piebench, _visor
seed = yaml.safe_load(open("params.yaml"))["table_seed"]
for folder, table in (("artifacts/multigen_images", _multigen(seed)), ("plots/piebench", _piebench(seed)),
                      ("plots/clip_score", _clip(seed)), ("artifacts/visor_images", _visor(seed))):
    Path(folder).mkdir(parents=True, exist_ok=True)
    table.to_csv(f"{{folder}}/trained.csv", index=False)
Path("metrics/fid").mkdir(parents=True, exist_ok=True)
Path("metrics/fid/trained.json").write_text('{{"coco": {{"fid": %d}}}}' % (20 + seed))
"""


IDENTITY = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
            for what, value in (("NAME", "t"), ("EMAIL", "t@example.org"))}  # experiments are commits


def _dvc(root: Path, *args: str) -> None:
    env = {**os.environ, **IDENTITY, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, check=True, capture_output=True)


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, env={**os.environ, **IDENTITY}, check=True, capture_output=True)


def test_an_experiment_is_read_by_name_with_dvc_tracked_tables(tmp_path, monkeypatch, capsys):
    root = tmp_path / "project"
    root.mkdir()
    _git(root, "init", "-q")
    _dvc(root, "init", "-q")
    (root / "make.py").write_text(MAKE_TABLES.format(tests=str(Path(__file__).parent)))
    (root / "params.yaml").write_text("table_seed: 1\n")
    (root / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          tables:
            cmd: python make.py
            deps: [make.py]
            params: [table_seed]
            outs:
              - artifacts/multigen_images/trained.csv
              - artifacts/visor_images/trained.csv
              - plots/piebench/trained.csv: {cache: false}
              - plots/clip_score/trained.csv: {cache: false}
            metrics:
              - metrics/fid/trained.json: {cache: false}
        """))
    env_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    monkeypatch.setenv("PATH", env_path)
    _dvc(root, "repro", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "base")
    _dvc(root, "exp", "run", "-q", "-S", "table_seed=2", "-n", "seed-two")
    monkeypatch.chdir(root)
    out = tmp_path / "diff.json"
    assert main(["HEAD", "seed-two", "--reps", "200", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["params"] == [["table_seed", 1, 2]] and result["skipped"] == {}
    (num_a, den_a), (num_b, den_b) = _mg_units(_multigen(1), 2), _mg_units(_multigen(2), 2)
    diff = result["multigen"]["coco"]["mg2"]["B-A"]["diff"]
    assert diff == pytest.approx(num_b.sum() / den_b.sum() - num_a.sum() / den_a.sum())
    assert result["fid"]["coco"]["B-A"] == {"diff": 1}
    assert "A: trained at HEAD; B: trained at seed-two" in capsys.readouterr().out
    assert main(["HEAD", "no-such-experiment"]) == 2
    assert "'no-such-experiment' is neither a Git revision nor a DVC experiment" in capsys.readouterr().err

"""The one log line per stage output that names failed rows and says whether the next run retries them."""

from __future__ import annotations

import logging
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.datasets.multigen_files import write_multigen
from pipeline.failures import (MISSING, collect_failures, prompt_image_id, report_failures,
                               summarize_failures)
from pipeline.runtime import FailureRateError, check_failure_rate
from pipeline.store.shards import write_table

REPO = Path(__file__).resolve().parents[1]


def _edit_rows() -> list[dict]:
    statuses = ["ok", "edit_failed", "bad_input", "ok", "edit_failed", "edit_failed", "edit_failed"]
    return [{"image_id": f"{i:04d}", "status": s} for i, s in enumerate(statuses)]


def test_line_counts_each_status_names_first_ids_and_says_what_retries_it():
    line = summarize_failures(_edit_rows(), lambda r: r["image_id"], {"edit_failed"}, where="edit@base",
                              unit="edits", id_name="image")
    assert line == ("edit@base: 5 of 7 edits failed: 4 edit_failed (retried by the next run; image 0001, 0004, "
                    "0005, ...), 1 bad_input (not retried: fix the input; image 0002)")


def test_no_line_when_nothing_failed():
    rows = [{"image_id": "a", "status": "ok"}]
    assert summarize_failures(rows, lambda r: r["image_id"], {"edit_failed"}, where="edit@base") is None
    assert summarize_failures([], lambda r: r["image_id"], (), where="edit@base") is None


def test_own_remedy_replaces_the_default_and_outcomes_outside_failed_are_not_listed():
    rows = [{"image_id": "7", "status": "corrupt_image"}, {"image_id": "7", "status": "corrupt_image"},
            {"image_id": "8", "status": "no_detection"}, {"image_id": "9", "status": "inference_failed"}]
    line = summarize_failures(rows, lambda r: r["image_id"], {"inference_failed"}, where="masks",
                              failed={"corrupt_image", "inference_failed"},
                              remedies={"corrupt_image": "not retried: the image bytes do not decode"})
    assert line == ("masks: 3 of 4 rows failed: 2 corrupt_image (not retried: the image bytes do not decode; 7), "
                    "1 inference_failed (retried by the next run; 9)")  # an id is listed once per status


def test_missing_items_count_in_the_total_without_ids():
    rows = [{"prompt_id": 0, "image_index": 1, "status": "detect_failed"}, {"prompt_id": 1, "image_index": 0,
                                                                           "status": "ok"}]
    failures = collect_failures(rows, prompt_image_id, missing=2)
    assert failures.counts == {"detect_failed": 1, MISSING: 2} and failures.total == 4 and failures.failed == 3
    assert failures.examples == {"detect_failed": ["0/1"]}


def test_report_logs_one_warning_and_its_counts_feed_the_failure_check(caplog):
    log = logging.getLogger("stages.edit")
    with caplog.at_level(logging.INFO, logger="stages.edit"):
        failures = report_failures(log, _edit_rows(), lambda r: r["image_id"], {"edit_failed"}, where="edit@base")
        report_failures(log, [{"image_id": "x", "status": "ok"}], lambda r: r["image_id"], (), where="edit@trained")
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert caplog.records[0].getMessage().startswith("edit@base: 5 of 7 rows failed: 4 edit_failed")
    with pytest.raises(FailureRateError) as raised:
        check_failure_rate(failures.counts, failures.total, 0.1, "edit base", "editing.max_failed_rate",
                           retried={"edit_failed"})
    assert str(raised.value) == (
        "edit base: 5 of 7 failed (limit 10.0%): 4 edit_failed (retried by the next run), 1 bad_input (not "
        "retried: fix the input); see the rows' `error` column, or raise editing.max_failed_rate")


def _prompt_file(path: Path, count: int) -> None:
    names = ["cat", "dog", "car", "cup", "bus"]
    write_multigen([{"unique_id": i, "num_objects": 5, **{f"obj_{k + 1}_attributes": [n] for k, n in enumerate(names)},
                     "text": "a photo of a cat, a dog, a car, a cup, and a bus."} for i in range(count)], path)


def test_score_stage_names_the_detections_it_leaves_out(tmp_path, monkeypatch, caplog):
    """score@<model> skips failed detections: its warning names them per prompt set, and its failure check
    says that detect_failed is retried by detect@, not by score itself."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profile"] = "demo"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    scale = params["profiles"]["demo"]["sampling"]
    prompts, per_prompt = scale["max_prompts"], scale["images_per_prompt"]
    status = {(0, 1): "detect_failed", (1, 0): "no_image"}
    for name in params["multigen"]["prompt_sets"]:
        _prompt_file(tmp_path / "artifacts/data/multigen" / f"{name}.json", prompts)
        rows = [{"prompt_id": p, "image_index": j, "objects": ["cat", "dog", "car", "cup", "bus"],
                 "label_max_scores": [0.5, 0.0, 0.0, 0.0, 0.0], "status": status.get((p, j), "ok")}
                for p in range(prompts) for j in range(per_prompt)]
        out = tmp_path / "artifacts/detections/sd14" / name
        out.mkdir(parents=True)
        write_table(rows, out / "part-00000.parquet")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["score.py", "sd14"])
    with caplog.at_level(logging.WARNING, logger="stages.score"), pytest.raises(FailureRateError) as raised:
        runpy.run_path(str(REPO / "stages" / "score.py"), run_name="__main__")
    lines = [r.getMessage() for r in caplog.records if r.name == "stages.score"]
    total = prompts * per_prompt
    assert len(lines) == len(params["multigen"]["prompt_sets"])
    assert lines[0].startswith(f"score@sd14 coco (left out of MG): 2 of {total} images failed: "
                               f"1 detect_failed (retried by the next run of detect@sd14; prompt/image 0/1), "
                               f"1 no_image (the sampling failed: sample@sd14 retries sample_failed images")
    assert "(retried by the next run of detect@sd14)" in str(raised.value)
    assert "no_image (the sampling failed" in str(raised.value)
    assert "retried by the next run)" not in str(raised.value)  # score itself retries nothing

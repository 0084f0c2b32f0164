"""Stage helpers: the failure-rate check every stage uses, the final barrier, one-line errors, `--help`."""

from datetime import timedelta
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.runtime import FailureRateError, check_failure_rate, run_stage


def test_failure_rate_limit_is_inclusive_and_names_the_param():
    check_failure_rate(1, 100, 0.01, "sample x", "multigen.max_failed_rate")  # exactly at the limit: passes
    check_failure_rate(0, 0, 0.0, "nothing", "p")  # no items: nothing to judge
    with pytest.raises(RuntimeError, match=r"masks rows: 2 of 100 failed \(limit 1.0%\).*raise grounding.max_failed_rate"):
        check_failure_rate(2, 100, 0.01, "masks rows", "grounding.max_failed_rate")
    with pytest.raises(FailureRateError, match=r"failed \(limit 1.0%\); rerun detect@x, or raise p$"):
        check_failure_rate(2, 100, 0.01, "x images", "p", "rerun detect@x")


def test_final_barrier_outlasts_nccl_default_timeout(monkeypatch):
    """Ranks that finish early wait at the stage's last barrier far longer than NCCL's 10 minutes."""
    import accelerate

    from pipeline import runtime

    made = []

    class RecordingState:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def wait_for_everyone(self):
            made.append("waited")

    monkeypatch.setattr(accelerate, "PartialState", RecordingState)
    monkeypatch.setenv("WORLD_SIZE", "1")
    runtime.wait_for_everyone()
    assert made == []  # one process: no process group at all
    monkeypatch.setenv("WORLD_SIZE", "2")
    runtime.wait_for_everyone()
    assert made[-1] == "waited" and made[0]["timeout"] >= timedelta(hours=1)


def test_stage_command_line_accepts_a_launcher_local_rank(monkeypatch):
    """torch.distributed.launch and DeepSpeed pass --local-rank / --local_rank to each process."""
    import sys

    from pipeline.runtime import stage_argument

    for argv in (["stage", "sd14", "--local-rank=0"], ["stage", "--local_rank", "1", "sd14"], ["stage", "sd14"]):
        monkeypatch.setattr(sys, "argv", argv)
        assert stage_argument("doc", "MODEL") == "sd14"
    monkeypatch.setattr(sys, "argv", ["stage", "sd14", "--bogus"])
    with pytest.raises(SystemExit):
        stage_argument("doc", "MODEL")


def test_stage_errors_end_in_one_line_without_a_traceback(monkeypatch, capsys):
    def bad_params():
        raise ConfigError("profiles.demo.train.batch_size: 0 is out of range; expected >= 1")

    monkeypatch.delenv("TOKENCOMPOSE_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_stage(bad_params)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: profiles.demo.train.batch_size: 0 is out of range; expected >= 1\n"
    with pytest.raises(SystemExit) as exit_info:
        run_stage(check_failure_rate, 2, 10, 0.1, "sd14/coco images", "multigen.max_failed_rate")
    assert exit_info.value.code == 1 and "raise multigen.max_failed_rate" in capsys.readouterr().err

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_stage(interrupted)
    assert exit_info.value.code == 130 and "run the stage again to resume" in capsys.readouterr().err

    def bug():
        raise ZeroDivisionError("a bug keeps its traceback")

    with pytest.raises(ZeroDivisionError):
        run_stage(bug)
    monkeypatch.setenv("TOKENCOMPOSE_TRACEBACK", "1")
    with pytest.raises(FailureRateError):
        run_stage(check_failure_rate, 2, 10, 0.1, "sd14/coco images", "multigen.max_failed_rate")


def test_failure_check_says_per_status_whether_the_next_run_retries_it():
    with pytest.raises(FailureRateError) as raised:
        check_failure_rate({"edit_failed": 3, "bad_input": 1, "ok_but_zero": 0}, 20, 0.1, "edit base",
                           "editing.max_failed_rate", retried={"edit_failed"})
    assert str(raised.value) == ("edit base: 4 of 20 failed (limit 10.0%): 3 edit_failed (retried by the next run), "
                                 "1 bad_input (not retried: fix the input); see the rows' `error` column, or raise "
                                 "editing.max_failed_rate")
    with pytest.raises(FailureRateError, match=r": 2 nan_image \(not retried: use float32\); see x, or raise p$"):
        check_failure_rate({"nan_image": 2}, 10, 0.1, "s", "p", "see x",
                           remedies={"nan_image": "not retried: use float32"})
    check_failure_rate({"edit_failed": 1, "bad_input": 1}, 20, 0.1, "edit base", "p")  # 10%: at the limit
    with pytest.raises(FailureRateError) as raised:  # a bare count claims nothing about retries
        check_failure_rate(3, 10, 0.1, "x images", "p")
    assert "retried" not in str(raised.value) and str(raised.value).endswith("see the rows' `error` column, or raise p")


def _chained(message: str) -> OSError:
    try:
        try:
            raise ConnectionError("offline mode is enabled")
        except ConnectionError as cause:
            raise OSError(message) from cause
    except OSError as err:
        return err


def test_one_line_error_names_the_root_cause_instead_of_a_stacktrace_it_does_not_show():
    from pipeline.runtime import without_traceback_pointers

    err = _chained("Cannot load model x/y: not cached. Please check out the root cause in the stacktrace above.")
    assert without_traceback_pointers(err) == ("Cannot load model x/y: not cached. Root cause: ConnectionError: "
                                               "offline mode is enabled.")
    plain = OSError("Error no file named model_index.json found in directory /m. See the docs.")
    assert without_traceback_pointers(plain) == str(plain)  # nothing points at a traceback: kept as it is
    lines = OSError("first line\nsee the Traceback above\nlast line.")
    assert without_traceback_pointers(lines) == "first line\n\nlast line."


def test_model_load_errors_keep_our_hint_and_point_at_no_stacktrace(tmp_path, monkeypatch, capsys):
    """A local folder that is not a model, and a hub id that is not cached (offline: tests/conftest.py), fail
    to load with one line that keeps the hint and never sends the reader to a stack trace it does not see."""
    from diffusers import StableDiffusionPipeline

    from pipeline.models import from_pretrained

    monkeypatch.delenv("TOKENCOMPOSE_TRACEBACK", raising=False)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("no model here\n")
    for ref, hint in ((str(folder), "check that the directory holds a save_pretrained layout"),
                      ("nobody-here/no-such-model", "hf download nobody-here/no-such-model")):
        with pytest.raises(SystemExit) as exit_info:
            run_stage(from_pretrained, StableDiffusionPipeline, ref, tmp_path / "models")
        err = capsys.readouterr().err
        line = [x for x in err.splitlines() if x.startswith("error: ")][-1]
        assert exit_info.value.code == 1 and "could not load StableDiffusionPipeline" in line and hint in line
        assert "stacktrace" not in err.lower() and "traceback" not in line.lower()
    assert "Root cause:" in line  # the hub case: the cause diffusers pointed at is named


def _help_of(script: Path, monkeypatch, capsys, name: str | None = "MODEL") -> str:
    import sys

    from pipeline.runtime import stage_argument

    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        stage_argument("Stage `x`: the docstring.", name, "a key")
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_lists_the_params_inputs_and_outputs_dvc_yaml_declares(monkeypatch, capsys):
    from pipeline.store.identity import PACKAGE_DIR

    text = _help_of(PACKAGE_DIR.parent / "stages" / "sample.py", monkeypatch, capsys)
    flat = " ".join(text.split())  # lines are wrapped at spaces
    assert "Stage `x`: the docstring." in text
    assert "Stage (dvc.yaml): sample@<MODEL>, <MODEL> one of: sd14, tokencompose_a," in flat
    assert ("Params read (dvc.yaml): profile, profiles.<profile>.cpu_threads, seed, sampling, multigen.prompt_sets, "
            "multigen.max_failed_rate, eval_models.<MODEL>, profiles.<profile>.sampling, "
            "profiles.<profile>.eval_models.<MODEL>") in flat
    assert "Inputs: artifacts/data/multigen, <eval_models.MODEL.dep>" in flat
    assert "Outputs: artifacts/samples/<MODEL>, metrics/sample/<MODEL>.json" in flat
    edit = " ".join(_help_of(PACKAGE_DIR.parent / "stages" / "edit.py", monkeypatch, capsys, "BACKBONE").split())
    assert "<edit_backbones.BACKBONE.dep>" in edit
    assert "edit_backbones.<BACKBONE>, eval_models.<BACKBONE>, profiles.<profile>.eval_models.<BACKBONE>" in edit


def test_help_never_fails_because_of_dvc_yaml(tmp_path, monkeypatch, capsys):
    script = tmp_path / "stages" / "sample.py"
    script.parent.mkdir()
    assert "Params read" not in _help_of(script, monkeypatch, capsys)  # no dvc.yaml beside the repository
    (tmp_path / "dvc.yaml").write_text("stages: [unclosed\n")
    assert "could not read the stage's params" in _help_of(script, monkeypatch, capsys)
    (tmp_path / "dvc.yaml").write_text("stages:\n  other:\n    cmd: python -m stages.other\n")
    assert "Params read" not in _help_of(script, monkeypatch, capsys)  # no stage runs this script
    (tmp_path / "dvc.yaml").write_text("stages:\n  sample:\n    foreach: ${models}\n    do:\n"
                                       "      cmd: python -m stages.sample ${key}\n      params: [seed]\n")
    text = _help_of(script, monkeypatch, capsys)  # no params.yaml: the foreach keys are named, not listed
    assert "one of: the keys of models in params.yaml" in text and "Params read (dvc.yaml): seed" in text

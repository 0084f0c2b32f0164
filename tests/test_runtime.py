"""Stage helpers: the failure-rate check every stage uses, the final barrier."""

from datetime import timedelta

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

"""Small helpers every stage uses: logging, metrics files, device choice, rank of this process."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import torch

from pipeline.config import ConfigError, StageError, active_profile, load_params


def stage_argument(doc: str | None, name: str | None = None, meaning: str = "") -> str | None:
    """Parse a stage script's command line: ``-h``/``--help`` prints the script's docstring, then what
    ``dvc.yaml`` declares for its stage (params read, inputs, outputs: :func:`pipeline.stage_help.declared_io`), and exits;
    the stage takes one positional argument ``name`` (described by ``meaning``) or none. A wrong command
    line exits with the usage before anything runs (``dvc.yaml`` runs the scripts with their arguments)."""
    import argparse

    script = Path(sys.argv[0])
    parser = argparse.ArgumentParser(prog=f"python -m stages.{script.stem}", description=doc, add_help=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from pipeline.stage_help import help_action

    parser.add_argument("-h", "--help", action=help_action(script, name),
                        help="show this help (and the stage's params, inputs and outputs in dvc.yaml) and exit")
    if name:
        parser.add_argument(name, help=meaning)
    # torch.distributed.launch and DeepSpeed pass the local rank as an option (torchrun and accelerate set
    # LOCAL_RANK, which the stages read); accept it so those launchers work too.
    parser.add_argument("--local-rank", "--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    return getattr(args, name) if name else None


class FailureRateError(StageError, RuntimeError):
    """More items of a stage failed than its params allow (:func:`check_failure_rate`)."""


def run_stage(main: Callable[..., None], *args: Any) -> None:
    """Run a stage's ``main(*args)`` with logging set up (:func:`setup_logging`). A
    :class:`pipeline.config.StageError` (bad params, a missing input, too many failures: the message names the
    input and the fix) ends it with that one line on stderr instead of a traceback, exit status 1 (a
    sentence in it that points at a stack trace gives way to the root cause: :func:`without_traceback_pointers`);
    ``TOKENCOMPOSE_TRACEBACK=1`` shows the traceback. An interrupt (Ctrl-C) ends it with exit status 130:
    finished shards and checkpoints are kept, and a rerun resumes. Torch's CPU threads are set from
    ``profiles.<p>.cpu_threads`` first (:func:`set_cpu_threads`)."""
    setup_logging()
    try:
        if Path(PARAMS_FILE).is_file():
            set_cpu_threads(load_params(PARAMS_FILE))
        main(*args)
    except KeyboardInterrupt:
        print("interrupted: finished shards and checkpoints are kept; run the stage again to resume",
              file=sys.stderr)
        raise SystemExit(130) from None
    except StageError as err:
        if os.environ.get("TOKENCOMPOSE_TRACEBACK"):
            raise
        print(f"error: {without_traceback_pointers(err)}", file=sys.stderr)
        raise SystemExit(1) from None


# A sentence that sends the reader to a stack trace (diffusers: "Please check out the root cause in the
# stacktrace above."), which the one-line error of run_stage does not show.
_TRACEBACK_SENTENCE = re.compile(r"(?:(?<=[.!?])[ \t]+|^)[^.!?\n]*\b(?:stack ?trace|traceback)s?\b[^.!?\n]*[.!?]?",
                                 re.IGNORECASE | re.MULTILINE)


def without_traceback_pointers(err: BaseException) -> str:
    """``err``'s text as :func:`run_stage` prints it, without a traceback: each sentence that points at a
    stack trace (a library's error embedded in ours, e.g. by :func:`pipeline.models.from_pretrained`) is
    replaced by the root cause it refers to, the last exception of the ``raise ... from`` chain."""
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    first = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    named = f" Root cause: {type(root).__name__}{': ' + first if first else ''}" if root is not err else ""
    if named and named[-1] not in ".!?":
        named += "."
    return _TRACEBACK_SENTENCE.sub(lambda match: named, str(err)).strip()


PARAMS_FILE = "params.yaml"


def set_cpu_threads(params: dict[str, Any]) -> None:
    """Set torch's intra-op threads to ``profiles.<p>.cpu_threads`` (0 or absent: torch's default, one per
    core). A fixed count makes CPU results independent of the machine: reductions split over threads add in
    another order, so the same stage on 1 and on 2 threads can differ in the last bits (and then so do the
    hashes DVC records)."""
    threads = active_profile(params).get("cpu_threads", 0)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ConfigError(f"profiles.{params['profile']}.cpu_threads: expected a non-negative integer, got {threads!r}")
    if threads:
        torch.set_num_threads(threads)
        logging.getLogger(__name__).debug("torch CPU threads: %d", threads)


def setup_logging(level: int = logging.INFO) -> None:
    """Log ``time level name: message`` to stderr (:func:`run_stage` calls it for every stage)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (keys sorted), creating parent folders; NaN becomes null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(obj), indent=2, sort_keys=True) + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


RETRIED = "retried by the next run"  # the stage's rerun computes rows of this status again (redo_statuses)
NOT_RETRIED = "not retried: fix the input"  # a rerun keeps them: the same input fails the same way
SEE_ERRORS = "see the rows' `error` column"


def status_remedy(status: str, retried: Collection[str], remedies: Mapping[str, str] | None = None) -> str:
    """What fixes rows of ``status``: its own text in ``remedies``, else :data:`RETRIED` when the stage's
    next run computes it again (``status in retried``), else :data:`NOT_RETRIED`."""
    if remedies and status in remedies:
        return remedies[status]
    return RETRIED if status in retried else NOT_RETRIED


def check_failure_rate(failed: int | Mapping[str, int], total: int, limit: float, where: str, param: str,
                       remedy: str | None = None, *, retried: Collection[str] = (),
                       remedies: Mapping[str, str] | None = None) -> None:
    """Raise when more than ``limit`` of ``total`` items failed (DESIGN §5: a stage fails loudly).

    ``failed`` is a count, or the failed items by status (``{"edit_failed": 3, "bad_input": 1}``): the
    message then says of each status whether the next run retries it (``retried``, the stage's
    ``redo_statuses``) or what fixes it (:func:`status_remedy`): ``3 edit_failed (retried by the next
    run), 1 bad_input (not retried: fix the input)``. ``param`` names the params key that sets ``limit``, so
    the message says how to accept more failures; ``remedy`` says where to look (default :data:`SEE_ERRORS`).
    """
    by_status = dict(failed) if isinstance(failed, Mapping) else {}
    count = sum(by_status.values()) if isinstance(failed, Mapping) else failed
    if not total or count / total <= limit:
        return
    detail = ", ".join(f"{n} {s} ({status_remedy(s, retried, remedies)})" for s, n in by_status.items() if n)
    raise FailureRateError(f"{where}: {count} of {total} failed (limit {limit:.1%}){': ' + detail if detail else ''}; "
                           f"{remedy or SEE_ERRORS}, or raise {param}")


def release_memory() -> None:
    """Return freed tensors' memory: collect garbage and empty the CUDA cache (after dropping a model)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rank_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is present (one process per GPU), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def default_device() -> torch.device:
    """CUDA if present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class DistInfo:
    """This process's rank and the number of processes (1 on a plain ``python`` run)."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size from the environment ``accelerate launch``/``torchrun`` set (else 0 of 1)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


# How long a rank that finished its shards waits for the others at a stage's final barrier. NCCL's default,
# 10 minutes, is shorter than one uneven shard of Attend-and-Excite sampling; a crashed rank still ends the
# run at once (torchrun stops the others).
BARRIER_TIMEOUT = timedelta(hours=24)


def wait_for_everyone() -> None:
    """Block until every process of a multi-process run gets here (returns at once for one process).

    On a machine without CUDA the processes meet over gloo: accelerate's plain ``PartialState()`` would
    see one process per rank there, and its barrier would not wait.
    """
    if dist_info().world_size > 1:
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT).wait_for_everyone()

"""Shared fixtures: embedded models built once per session, the real data folder, offline hub."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Stage scripts run in tests raise their errors (pytest.raises) instead of printing one line and exiting.
os.environ.setdefault("TOKENCOMPOSE_TRACEBACK", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # stage scripts (`stages/`) import the same way under `pytest` and `python -m pytest`
    sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread per test process: `make test` runs two processes on two cores, and more threads
    oversubscribe the machine and run many times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def bare_argv(monkeypatch):
    """Stage scripts run in-process (``runpy``) parse ``sys.argv``: give them a bare one, not pytest's."""
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real public files); tests that need it skip with a message when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present (it sits beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models folder where :func:`embedded` builds models on first use (seed 0)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def embedded(models_dir):
    """``embedded(name) -> Path``: build an embedded model once per session and return its folder."""
    from pipeline import zoo

    def get(name: str) -> Path:
        path = models_dir / name
        if not path.exists():
            zoo.build(name, path, seed=0)
        return path

    return get


@pytest.fixture(scope="session")
def tiny_sd(embedded) -> Path:
    """Folder of the embedded tiny Stable Diffusion pipeline."""
    return embedded("tiny-sd")


@pytest.fixture(scope="session")
def clip_tokenizer():
    """The real CLIP tokenizer (open_clip's vocabulary), as SD1.4 uses it."""
    from pipeline.zoo.sd import clip_tokenizer as make

    return make()

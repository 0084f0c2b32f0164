"""Registry of embedded models: small configs built with seeded random weights (DESIGN §4).

``embedded:NAME`` model references resolve to ``artifacts/models/NAME``, which the ``models`` stage writes
with :func:`build` in the standard ``save_pretrained`` layout, so later stages load embedded models and
real checkpoints by one code path. Each family registers its builders in its own module of this package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass(frozen=True)
class EmbeddedModel:
    """A buildable embedded model: ``build(out_dir, seed)`` writes it to ``out_dir``."""

    name: str
    description: str
    build: Callable[[Path, int], None]


REGISTRY: dict[str, EmbeddedModel] = {}


def register(name: str, description: str) -> Callable[[Callable[[Path, int], None]], Callable[[Path, int], None]]:
    """Decorator that adds a builder ``fn(out_dir, seed)`` to :data:`REGISTRY` under ``name``."""

    def wrap(fn: Callable[[Path, int], None]) -> Callable[[Path, int], None]:
        if name in REGISTRY:
            raise ValueError(f"embedded model {name!r} registered twice")
        REGISTRY[name] = EmbeddedModel(name, description, fn)
        return fn

    return wrap


def build(name: str, out_dir: Path, seed: int) -> Path:
    """Build embedded model ``name`` with weights drawn from ``seed`` and write it to ``out_dir``.

    The global torch RNG is forked so building a model never changes other random streams.
    """
    if name not in REGISTRY:
        raise KeyError(f"unknown embedded model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    from pipeline.models import quiet_loading

    quiet_loading()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        REGISTRY[name].build(out_dir, seed)
    _drop_runtime_keys(out_dir)
    (out_dir / "embedded.json").write_text(json.dumps({"name": name, "seed": seed}, indent=1) + "\n")
    return out_dir


RUNTIME_KEYS = ("local_files_only",)  # written by transformers from the environment (HF_HUB_OFFLINE)


def _drop_runtime_keys(out_dir: Path) -> None:
    """Remove settings of the building process from saved configs, so a build is byte-identical anywhere."""
    for path in sorted(out_dir.rglob("*_config.json")):
        config = json.loads(path.read_text())
        if isinstance(config, dict) and any(k in config for k in RUNTIME_KEYS):
            for key in RUNTIME_KEYS:
                config.pop(key, None)
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# Families register on import (after REGISTRY and register exist: each family's module imports them).
from pipeline.zoo import sd  # noqa: E402,F401
from pipeline.zoo import detection  # noqa: E402,F401
from pipeline.zoo import piebench  # noqa: E402,F401
from pipeline.zoo import grounding  # noqa: E402,F401

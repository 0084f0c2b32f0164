"""Stage `models`: build the active profile's embedded models into ``<models_dir>/<name>``.

Outs: artifacts/models/ (save_pretrained layout per model), metrics/models.json.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import zoo
from pipeline.config import ConfigError, load_params, profile_fields
from pipeline.runtime import run_stage, stage_argument, write_json

log = logging.getLogger("stages.models")
OUT = Path("artifacts/models")  # this stage's out in dvc.yaml, replaced whole on every run


@dataclass(frozen=True)
class ModelsScale:
    models_dir: Path
    embedded_seed: int
    embedded: list[str]


def main() -> None:
    params = load_params()
    cfg = profile_fields(params, ModelsScale)
    if cfg.models_dir.resolve() != OUT.resolve():  # never empty a folder that is not this stage's output
        raise ConfigError(f"profiles.{params['profile']}.models_dir: {cfg.models_dir} is not {OUT}, the folder the "
                          f"models stage writes (its out in dvc.yaml); keep models_dir: {OUT} and give other "
                          f"local models by their own path in the model references")
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    for name in cfg.embedded:
        start = time.perf_counter()
        zoo.build(name, cfg.models_dir / name, cfg.embedded_seed)
        log.info("built embedded:%s in %.1fs", name, time.perf_counter() - start)
    write_json("metrics/models.json", {"profile": params["profile"], "seed": cfg.embedded_seed,
                                       "models": len(cfg.embedded), "embedded": ",".join(cfg.embedded)})


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)

"""Stage `models`: build the active profile's embedded models into ``artifacts/models/<name>``.

Outs: artifacts/models/ (save_pretrained layout per model), metrics/models.json.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass

from pipeline import zoo
from pipeline.config import ConfigError, load_params, profile_fields
from pipeline.paths import MODELS_DIR as OUT  # this stage's out in dvc.yaml, replaced whole on every run
from pipeline.runtime import run_stage, stage_argument, write_json

log = logging.getLogger("stages.models")


@dataclass(frozen=True)
class ModelsScale:
    embedded_seed: int
    embedded: list[str]


def main() -> None:
    params = load_params()
    cfg = profile_fields(params, ModelsScale)
    unknown = [name for name in cfg.embedded if name not in zoo.REGISTRY]
    if unknown:
        raise ConfigError(f"profiles.{params['profile']}.embedded: {unknown} are not embedded models; known: "
                          f"{', '.join(sorted(zoo.REGISTRY))}")
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    for name in cfg.embedded:
        start = time.perf_counter()
        zoo.build(name, OUT / name, cfg.embedded_seed)
        log.info("built embedded:%s in %.1fs", name, time.perf_counter() - start)
    write_json("metrics/models.json", {"profile": params["profile"], "seed": cfg.embedded_seed,
                                       "models": len(cfg.embedded), "embedded": ",".join(cfg.embedded)})


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)

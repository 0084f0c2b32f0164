"""Stage `prompts`: the MultiGen prompt sets in the official file format (SPEC §3.1).

``source: generate`` writes seeded sets of ``demo_data.num_prompts`` prompts over the COCO and ADE20K
class lists in data/categories/; ``source: official`` fetches the official files, checks their SHA-256
and their format, and writes them unchanged.
Outs: artifacts/data/multigen/{coco,ade20k}.json, metrics/prompts.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import load_params, section
from pipeline.datasets.demo_scale import DemoDataScale
from pipeline.datasets.multigen_files import MULTIGEN_SETS, prompt_objects
from pipeline.datasets.multigen_source import PromptsScale, prepare_multigen_set
from pipeline.fetch import sha256_bytes
from pipeline.runtime import run_stage, stage_argument, write_json

log = logging.getLogger("stages.prompts")
OUT = Path("artifacts/data/multigen")


def main() -> None:
    params = load_params()
    cfg = section(params, "profile.prompts", PromptsScale)
    num_prompts = section(params, "profile.demo_data", DemoDataScale).num_prompts
    metrics = {"profile": params["profile"], "source": cfg.source, "seed": params["seed"]}
    for name in MULTIGEN_SETS:
        dest = OUT / f"{name}.json"
        entries = prepare_multigen_set(cfg, name, params["seed"], num_prompts, dest)
        metrics[f"{name}_prompts"] = len(entries)
        metrics[f"{name}_categories"] = len({o for e in entries for o in prompt_objects(e)})
        metrics[f"{name}_sha256"] = sha256_bytes(dest.read_bytes())
        log.info("%s: %d prompts -> %s", name, len(entries), dest)
    write_json("metrics/prompts.json", metrics)


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)

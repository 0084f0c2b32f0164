"""Stage `attention_maps`: per-token cross-attention figures of base and trained models (study Figs. 3, 4, 8).

For each model of ``profiles.<p>.attention_maps.models`` (keys of ``eval_models``) and each configured prompt,
the sampler generates the image with the same seed for every model while cross-attention is recorded per
denoising step. Outs: plots/attention/<model>_<i>.png, metrics/attention_maps.json.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline.attention_maps.figures import AttentionMapsCfg, AttentionMapsScale, write_attention_figures
from pipeline.attention_maps.recording import load_sampler, recordable_model
from pipeline.config import load_params, section
from pipeline.runtime import FailureRateError, run_stage, stage_argument, write_json

log = logging.getLogger("stages.attention_maps")
OUT = Path("plots/attention")


def main() -> None:
    params = load_params()
    cfg = section(params, "attention_maps", AttentionMapsCfg)
    scale = section(params, "profile.attention_maps", AttentionMapsScale)
    for key in scale.models:  # every model checked before any is sampled
        recordable_model(params, key)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    metrics = {"prompts": len(scale.prompts), "groups": ",".join(cfg.groups), "steps": ",".join(map(str, scale.steps))}
    for key in scale.models:
        sampler, ref = load_sampler(params, key)
        written = write_attention_figures(sampler, key, scale.prompts, cfg.groups, scale.steps, OUT, cfg.cell_size)
        log.info("%s: %d attention figures", key, len(written))
        metrics.update({f"{key}_figures": len(written), f"{key}_model": ref.model, f"{key}_unet": ref.unet or "",
                        f"{key}_size": sampler.size, f"{key}_num_inference_steps": sampler.scale.num_inference_steps})
    write_json("metrics/attention_maps.json", metrics)
    missing = [k for k in scale.models if metrics[f"{k}_figures"] < len(scale.prompts)]
    if missing:
        raise FailureRateError(f"attention_maps: sampling failed for some prompts of {missing}; see the log above")


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)

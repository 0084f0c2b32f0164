"""Driver for the two-process training test: ``torchrun --nproc_per_node 2 tests/dist_train.py ...``.

Arguments: images dir, masks dir, tiny-sd dir, output dir, max steps. Each rank trains with
:class:`pipeline.training.trainer.Trainer` (accelerate, CPU, gloo) and writes ``<out>/rank<r>.json`` with its final
UNet hash, metrics and curves, so the test can compare ranks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.training.losses import LossCfg  # noqa: E402
from pipeline.training.settings import OptimCfg, TrainCfg, TrainRun, TrainScale  # noqa: E402
from pipeline.training.sources import load_records  # noqa: E402
from pipeline.training.trainer import Trainer  # noqa: E402
from pipeline.store.identity import state_dict_hash  # noqa: E402

RES = 128


def main(images: str, masks: str, tiny_sd: str, out: str, max_steps: str) -> None:
    records, _ = load_records(Path(images), Path(masks), RES)
    run = TrainRun(
        sd_model=tiny_sd, models_dir=Path(tiny_sd).parent, resolution=RES, seed=0,
        loss=LossCfg(token_weight=1e-3, pixel_weight=5e-5, layers=["mid_8", "up_16", "up_32", "up_64"]),
        optim=OptimCfg(lr=1e-4, weight_decay=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, max_grad_norm=1.0),
        train=TrainCfg(checkpoint_limit=2),
        scale=TrainScale(batch_size=1, grad_accum=2, max_steps=int(max_steps), checkpoint_every=2),
        out_dir=Path(out),
    )
    trainer = Trainer(run, records)
    result = trainer.run_loop()
    rank = int(os.environ["RANK"])
    report = {"unet": state_dict_hash(trainer.models.unet), "metrics": result.metrics, "this_run": result.this_run,
              "curves": result.curves}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])

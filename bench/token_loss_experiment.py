"""Does the token loss move attention into the objects' masks? A short CPU run on the embedded tiny model.

Two fine-tunings of ``embedded:tiny-sd`` on the demo training images with their true masks, identical in
everything (seed, data order, noise, steps, lr, pixel weight) except ``loss.token_weight``: the chosen
weight vs 0. Afterwards, on the held-out demo images (never trained on), the share of each noun's
cross-attention that falls inside its true mask (:func:`pipeline.training.attention_share`, groups
mid_8/up_16/up_32/up_64, five noise levels) is measured for the base model and both fine-tuned models,
next to the chance level (the mask's share of the map).

The tiny model has random weights and the run is short, so the weight and the learning rate are larger than
the paper's (1e-3, 5e-6); both are recorded in the result. Writes bench/results/token_loss_experiment.json.

    python bench/token_loss_experiment.py [--steps 120] [--token-weight 1.0] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from pipeline import zoo
from pipeline.demo_data import write_demo_training_set
from pipeline.losses import LossCfg
from pipeline.runtime import setup_logging, write_json
from pipeline.training import (OptimCfg, TrainCfg, TrainRun, TrainScale, attention_share, load_models,
                               object_mask_records, train)

log = logging.getLogger("bench.token_loss_experiment")
LAYERS = ["mid_8", "up_16", "up_32", "up_64"]
TIMESTEPS = [100, 300, 500, 700, 900]
RES = 128


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=120, help="optimizer steps of each fine-tuning")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--token-weight", type=float, default=1.0)
    p.add_argument("--pixel-weight", type=float, default=5e-5, help="the same in both runs")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--images", type=int, default=64, help="demo images (a quarter held out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription)")
    p.add_argument("--out", type=Path, default=Path("bench/results/token_loss_experiment.json"))
    return p.parse_args()


def fine_tune(args, root: Path, model_dir: Path, records, token_weight: float, name: str) -> dict:
    run = TrainRun(
        sd_model=str(model_dir), models_dir=model_dir.parent, resolution=RES, seed=args.seed,
        loss=LossCfg(token_weight=token_weight, pixel_weight=args.pixel_weight, layers=LAYERS),
        optim=OptimCfg(lr=args.lr, weight_decay=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, max_grad_norm=1.0),
        train=TrainCfg(checkpoint_limit=1),
        scale=TrainScale(batch_size=args.batch_size, grad_accum=1, max_steps=args.steps,
                         checkpoint_every=args.steps),
        out_dir=root / name,
    )
    result = train(run, records)
    return {"final_token": result.metrics.get("final_token"), "final_denoise": result.metrics["final_denoise"],
            "seconds": result.this_run["seconds_this_run"], "unet": str(root / name / "unet")}


def share_of(models, unet, records, seed: int) -> dict[str, float]:
    unet.eval()
    return attention_share(unet, models, records, LAYERS, RES, TIMESTEPS, seed)


def main() -> None:
    setup_logging()
    args = parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="token-loss-exp-") as tmp:
        root = Path(tmp)
        model_dir = zoo.build("tiny-sd", root / "models" / "tiny-sd", seed=args.seed)
        write_demo_training_set(root / "images", args.images, RES, args.seed, 16, heldout_fraction=0.25)
        models = load_models(str(model_dir), model_dir.parent)
        train_recs, _ = object_mask_records(root / "images", models.tokenizer, RES, "train")
        held_recs, unaligned = object_mask_records(root / "images", models.tokenizer, RES, "heldout")
        runs = {"token_loss": fine_tune(args, root, model_dir, train_recs, args.token_weight, "with"),
                "no_token_loss": fine_tune(args, root, model_dir, train_recs, 0.0, "without")}
        from diffusers import UNet2DConditionModel

        shares = {"base": share_of(models, models.unet, held_recs, args.seed)}
        for name, info in runs.items():
            unet = UNet2DConditionModel.from_pretrained(info.pop("unet"))
            shares[name] = share_of(models, unet, held_recs, args.seed)
            shares[f"{name}_train_images"] = share_of(models, unet, train_recs[: len(held_recs)], args.seed)
    result = {
        "heldout_share_token_loss": shares["token_loss"]["share"],
        "heldout_share_no_token_loss": shares["no_token_loss"]["share"],
        "heldout_share_base": shares["base"]["share"],
        "heldout_chance": shares["base"]["chance"],
        "ratio_token_vs_no_token": shares["token_loss"]["share"] / shares["no_token_loss"]["share"],
        "train_images_share_token_loss": shares["token_loss_train_images"]["share"],
        "train_images_share_no_token_loss": shares["no_token_loss_train_images"]["share"],
        "per_group": {name: {k: v for k, v in s.items() if k.startswith(("share_", "chance_"))}
                      for name, s in shares.items()},
        "runs": runs,
        "settings": {"model": "embedded:tiny-sd (random weights)", "resolution": RES, "steps": args.steps,
                     "batch_size": args.batch_size, "lr": args.lr, "token_weight": args.token_weight,
                     "pixel_weight": args.pixel_weight, "layers": LAYERS, "timesteps": TIMESTEPS,
                     "train_images": len(train_recs), "heldout_images": len(held_recs),
                     "heldout_words": shares["base"]["words"], "unaligned_heldout_objects": unaligned,
                     "seed": args.seed, "device": "cpu", "torch_threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - began, 1),
    }
    write_json(args.out, result)
    log.info("held-out share in mask: token loss %.4f vs none %.4f (base %.4f, chance %.4f) -> %s",
             result["heldout_share_token_loss"], result["heldout_share_no_token_loss"],
             result["heldout_share_base"], result["heldout_chance"], args.out)


if __name__ == "__main__":
    main()

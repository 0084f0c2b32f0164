"""GPU-hours of the paper profile on one H100 from the measured benchmark rates: writes docs/cost.md.

The work of each GPU stage comes from params.yaml (``profiles.paper`` and the method sections) and the
sizes of the paper's data sets; the rates come from the H100 results in bench/results/ (samples/s of
``bench/train_step.py``, images/s of ``bench/sampling_throughput.py``), and the achieved TFLOP/s and MFU
from the fields ``bench/mfu.py`` (or a CUDA bench run) wrote into them. Each row names the variant whose
rate it uses: the one that runs the paper profile's settings, and the fastest measured setting. A stage
without an H100 measurement says so and is left out of the total. ``--num_processes 8`` is the total
divided by 8: the ideal, with no allowance for the launch, the stragglers or the communication.

    python bench/cost.py            # rewrites docs/cost.md
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.mfu import resolution_of, sampling_variants  # noqa: E402

RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "cost.md"
PROCESSES = 8
# Sizes of the paper's data sets that params.yaml does not hold:
MULTIGEN_PROMPTS_PER_SET = 1000  # the official coco/ade20k_obj_comp_5_1k.json files: 1,000 prompts each
PIEBENCH_IMAGES = 700            # PIE-Bench's mapping_file.json (docs/data.md)
TRAIN_IMAGES = 4526              # TokenCompose's training metadata, all used (heldout_fraction 0; docs/data.md)
TRAIN_FILE, SAMPLING_FILE = "train_step_cuda.json", "sampling_throughput_cuda.json"
MASKS_FILE = "masks_throughput_gpu_h200_fp32.json"
OTHER_FILES = ("sampling_throughput_cuda_h200.json",)


@dataclass(frozen=True)
class Row:
    """One stage's work and, per column, (rate text, hours or None when not measured)."""

    stage: str
    work: str
    paper: tuple[str, float | None]
    fastest: tuple[str, float | None]


def load(name: str) -> dict:
    """A result file of bench/results/."""
    return json.loads((RESULTS / name).read_text())


def paper_work(params: dict) -> dict:
    """The paper profile's amounts of work per GPU stage, from params.yaml and the data sets' sizes."""
    from pipeline.visor import SPATIAL_SIZE

    paper = params["profiles"]["paper"]
    sampling, train, visor = paper["sampling"], paper["train"], paper["visor"]
    models = params["eval_models"]
    plain = [k for k, v in models.items() if v["sampler"] == "sd"]
    other = [k for k, v in models.items() if v["sampler"] != "sd"]
    prompts = MULTIGEN_PROMPTS_PER_SET if sampling["max_prompts"] is None else min(
        sampling["max_prompts"], MULTIGEN_PROMPTS_PER_SET)
    sets = len(params["multigen"]["prompt_sets"])
    visor_prompts = SPATIAL_SIZE if visor["max_prompts"] is None else visor["max_prompts"]
    per_model = sets * prompts * sampling["images_per_prompt"]
    visor_per_model = visor_prompts * params["visor"]["images_per_prompt"]
    return {
        "plain_models": plain, "other_models": other, "sets": sets, "prompts": prompts,
        "images_per_prompt": sampling["images_per_prompt"], "multigen_images_per_model": per_model,
        "visor_prompts": visor_prompts, "visor_images_per_prompt": params["visor"]["images_per_prompt"],
        "visor_images_per_model": visor_per_model,
        "train_samples": train["max_steps"] * train["batch_size"] * train["grad_accum"],
        "train_steps": train["max_steps"], "train_batch": train["batch_size"], "grad_accum": train["grad_accum"],
        "edit_backbones": len(params["edit_backbones"]),
        "edits": PIEBENCH_IMAGES * len(params["edit_backbones"]),
        "mask_images": TRAIN_IMAGES,
    }


def train_variant(results: dict, train: dict, cached: bool | None = None) -> str:
    """The measured training variant that runs ``profiles.paper.train``'s settings (``cached``: override
    ``cache_latents``); the step's batch is the micro-batch ``batch_size``."""
    want = {"batch": train["batch_size"], "precision": train["mixed_precision"],
            "checkpointing": train["gradient_checkpointing"], "compiled": train["compile"],
            "cached": train["cache_latents"] if cached is None else cached}
    def settings(v: dict) -> dict:
        return {"batch": v["batch"], "precision": "bf16" if v["bf16"] else "fp32", "checkpointing": v["checkpointing"],
                "compiled": v["compiled"], "cached": "cached" in str(v["vae_encodes_per_step"])}

    found = [n for n, v in results["variants"].items() if v["stored_maps"] == "10 cross layers" and settings(v) == want]
    if len(found) != 1:
        raise ValueError(f"{len(found)} measured training variants run the paper's settings {want}")
    return found[0]


def sampling_variant(results: dict, sampling: dict) -> str:
    """The measured seeded-sampler variant that runs ``profiles.paper.sampling``'s settings on CUDA."""
    dtype = {"auto": "fp16", "float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[sampling["dtype"]]
    found = [n for n, (batch, precision, _) in sampling_variants(results).items()
             if n.startswith("seeded_") and batch == sampling["batch_size"] and precision == dtype
             and n.endswith("_compiled") == sampling["compile"]]
    if len(found) != 1:
        raise ValueError(f"{len(found)} measured sampling variants run the paper's settings {sampling}")
    return found[0]


def fastest_train(results: dict) -> str:
    """The fastest measured training variant the pipeline can run (capture, not the original's eager maps)."""
    names = [n for n, v in results["variants"].items() if v["stored_maps"] == "10 cross layers"]
    return max(names, key=lambda n: results["variants"][n]["samples_per_s"])


def fastest_sampling(results: dict) -> str:
    """The fastest measured variant of the pipeline's own (seeded) sampler."""
    names = [n for n in sampling_variants(results) if n.startswith("seeded_")]
    return max(names, key=lambda n: results[f"{n}_images_per_s"])


def hours(items: float, rate: float) -> float:
    """GPU-hours for ``items`` at ``rate`` per second."""
    return items / rate / 3600


def _n(x: int) -> str:
    return f"{x:,}"


def rows(params: dict, train: dict, sampling: dict) -> tuple[list[Row], dict]:
    """The table's rows and the facts its notes quote."""
    work, paper = paper_work(params), params["profiles"]["paper"]
    for what, value, want in (("sampling steps", sampling["steps"], paper["sampling"]["num_inference_steps"]),
                              ("sampling resolution", resolution_of(sampling), paper["resolution"])):
        if value != want:
            raise ValueError(f"the H100 sampling bench ran {what} {value}, the paper profile {want}")
    for results, key in ((train, "device_name"), (sampling, "device")):
        if not results[key].startswith("NVIDIA H100") or not results["complete"]:
            raise ValueError(f"not a complete H100 result: {results[key]}")
    s_paper, s_fast = sampling_variant(sampling, paper["sampling"]), fastest_sampling(sampling)
    t_paper, t_fast = train_variant(train, paper["train"]), fastest_train(train)
    t_first = train_variant(train, paper["train"], cached=False)
    ips = {n: sampling[f"{n}_images_per_s"] for n in (s_paper, s_fast)}
    sps = {n: train["variants"][n]["samples_per_s"] for n in (t_paper, t_fast, t_first)}

    def rate(name: str, value: float, unit: str) -> str:
        return f"`{name}`: {value:.2f} {unit}/s"

    plain, other = work["plain_models"], work["other_models"]
    none = ("no GPU measurement", None)
    out = []
    for stage, per_model in (("`sample`", work["multigen_images_per_model"]),
                             ("`visor` sampling", work["visor_images_per_model"])):
        images = per_model * len(plain)
        out.append(Row(f"{stage} ({', '.join(plain)})", f"{_n(images)} images",
                       (rate(s_paper, ips[s_paper], "images"), hours(images, ips[s_paper])),
                       (rate(s_fast, ips[s_fast], "images"), hours(images, ips[s_fast]))))
        out.append(Row(f"{stage} ({', '.join(other)})", f"{_n(per_model * len(other))} images",
                       ("no GPU measurement (Attend-and-Excite's latent updates are not benchmarked)", None), none))
    samples, first = work["train_samples"], min(TRAIN_IMAGES, work["train_samples"])
    out.append(Row("`train`", f"{_n(work['train_steps'])} steps × {work['train_batch']} × {work['grad_accum']} "
                   f"= {_n(samples)} samples",
                   (f"{rate(t_first, sps[t_first], 'samples')} for the first epoch's {_n(first)}, then "
                    f"{rate(t_paper, sps[t_paper], 'samples')}",
                    hours(first, sps[t_first]) + hours(samples - first, sps[t_paper])),
                   (rate(t_fast, sps[t_fast], "samples"), hours(samples, sps[t_fast]))))
    all_models = work["multigen_images_per_model"] * (len(plain) + len(other))
    out.append(Row("`detect` (OWLv2)", f"{_n(all_models)} images", none, none))
    visor_all = work["visor_images_per_model"] * (len(plain) + len(other))
    out.append(Row("`visor` detection (OWL-ViT)", f"{_n(visor_all)} images", none, none))
    out.append(Row("`masks` (Grounding DINO + SAM-HQ)", f"{_n(work['mask_images'])} images",
                   ("no H100 measurement (an H200 one: notes)", None), none))
    out.append(Row("`edit` (Blended Latent Diffusion)",
                   f"{_n(PIEBENCH_IMAGES)} × {work['edit_backbones']} backbones = {_n(work['edits'])} edits",
                   none, none))
    facts = dict(work=work, s_paper=s_paper, s_fast=s_fast, t_paper=t_paper, t_fast=t_fast, t_first=t_first)
    return out, facts


def _peak(peak: float | None, mfu: float | None) -> str:
    """The peak and MFU cells ("—" for a GPU without a peak in the table)."""
    return "— | —" if peak is None else f"{peak:.1f} | {100 * mfu:.1f}%"


def chain_order(variants: dict) -> list[str]:
    """Training variant names in the bench's order (each adds one change), unknown names last."""
    from bench.train_step import VARIANTS

    order = list(VARIANTS)
    return sorted(variants, key=lambda n: (order.index(n) if n in order else len(order), n))


def _h(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def mfu_table(results: dict, file: str) -> list[str]:
    """Markdown rows: each variant's rate, FLOPs per item, achieved TFLOP/s, peak and MFU (fields of the JSON)."""
    if any(k not in results for k in ("flops", "fp32_math")):
        raise ValueError(f"{file} has no FLOP fields: run `python bench/mfu.py` first")
    lines = ["| variant | rate | TFLOP per item | achieved TFLOP/s | peak TFLOP/s | MFU |", "|---|---|---|---|---|---|"]
    if "variants" in results:
        for name in chain_order(results["variants"]):
            v = results["variants"][name]
            lines.append(f"| `{name}` | {v['samples_per_s']:.2f} samples/s | {v['tflop_per_sample']:.3f} | "
                         f"{v['achieved_tflops']:.1f} | {_peak(v['peak_tflops'], v['mfu'])} |")
    else:
        for name in sampling_variants(results):
            lines.append(f"| `{name}` | {results[f'{name}_images_per_s']:.2f} images/s | "
                         f"{results[f'{name}_tflop_per_image']:.3f} | {results[f'{name}_achieved_tflops']:.1f} | "
                         f"{_peak(results[f'{name}_peak_tflops'], results[f'{name}_mfu'])} |")
    return lines


def render(params: dict, train: dict, sampling: dict, masks: dict, others: dict[str, dict]) -> str:
    """docs/cost.md for these params and results."""
    table, f = rows(params, train, sampling)
    work = f["work"]
    total_paper = sum(r.paper[1] for r in table if r.paper[1] is not None)
    total_fast = sum(r.fastest[1] for r in table if r.fastest[1] is not None)
    masks_h200 = work["mask_images"] * (1 / masks["detector_single_images_per_s"]
                                        + 1 / masks["segmenter_single_images_per_s"]) / 3600
    batch4 = train["variants"].get("batch4")
    lines = [
        "# Cost: GPU-hours of the paper profile",
        "",
        "Generated by `python bench/cost.py` from `params.yaml` and `bench/results/` — do not edit by hand "
        "(`tests/test_docs_numbers.py` checks that this file is the generator's output).",
        "",
        f"GPU-hours on one **{train['device_name']}** at the rates measured by `bench/train_step.py` "
        f"(`bench/results/{TRAIN_FILE}`) and `bench/sampling_throughput.py` (`bench/results/{SAMPLING_FILE}`): "
        "SD1.4's architecture with random weights at 512 px, which runs at the speed of the real weights "
        "(the time depends on the shapes and kernels, not on the weights' values). *Paper settings* is the "
        "variant that runs `profiles.paper`'s settings; *fastest* is the fastest measured setting of the same "
        "stage (notes). Stages without a GPU measurement say so and are not in the totals; they are not free.",
        "",
        "| stage | work (paper profile) | paper settings: variant, rate | GPU-h | fastest measured: variant, rate "
        "| GPU-h |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| {r.stage} | {r.work} | {r.paper[0]} | {_h(r.paper[1])} | {r.fastest[0]} | "
                     f"{_h(r.fastest[1])} |")
    lines += [
        f"| **total, measured stages** | | | **{total_paper:.2f}** | | **{total_fast:.2f}** |",
        f"| `--num_processes {PROCESSES}`, ideal (total / {PROCESSES}) | | | {total_paper / PROCESSES:.2f} | "
        f"| {total_fast / PROCESSES:.2f} |",
        "",
        "Notes:",
        "",
        f"- Work: {len(work['plain_models']) + len(work['other_models'])} evaluated models (`eval_models`) × "
        f"{work['sets']} prompt sets × {_n(work['prompts'])} prompts × {work['images_per_prompt']} images for "
        f"`sample` and `detect`; VISOR {_n(work['visor_prompts'])} prompts × {work['visor_images_per_prompt']} "
        f"images per model (`profiles.paper.visor.max_prompts`), sampled with the same settings; training "
        f"`max_steps` × `batch_size` × `grad_accum`; {_n(PIEBENCH_IMAGES)} PIE-Bench edits per backbone; masks "
        f"of the {_n(TRAIN_IMAGES)} training images.",
        f"- Sampling, paper settings: `{f['s_paper']}` is the seeded sampler at `profiles.paper.sampling`'s "
        f"dtype (`auto`: fp16 on CUDA), batch and `compile: false`. Fastest: `{f['s_fast']}` (two prompts per "
        "call and `sampling.compile: true`; the same images to within 1/255, docs/multigen.md).",
        f"- Training, paper settings: fp32, micro-batch {work['train_batch']}, gradient checkpointing, cached "
        f"latents: `{f['t_paper']}`; the first epoch still encodes every image, at the rate of `{f['t_first']}` "
        "(the same step without the cache). The bench steps the optimizer every micro-batch; the paper's "
        f"accumulation of {work['grad_accum']} steps it every {work['grad_accum']}th, so the row is slightly "
        f"high. Fastest: `{f['t_fast']}` (batch {train['variants'][f['t_fast']]['batch']}, bf16, no "
        "checkpointing, compiled) — the same number of samples, but an effective batch of "
        f"{train['variants'][f['t_fast']]['batch']} instead of {work['train_batch'] * work['grad_accum']}, "
        "so not the paper's recipe.",
        ("- The paper's effective batch in one step (batch 4 × accumulation 1): `batch4`, "
         f"{batch4['samples_per_s']:.2f} samples/s, "
         f"{hours(work['train_samples'], batch4['samples_per_s']):.2f} GPU-h." if batch4 else
         "- The paper's effective batch in one step (batch 4 × accumulation 1, bf16) is the `batch4` variant of "
         "`bench/train_step.py`; it has no H100 measurement yet (`bash bench/cuda.sh train`)."),
        f"- Masks: no H100 measurement. On an **H200** (`bench/results/{MASKS_FILE}`, batch 1, fp32 as the "
        f"paper profile) the detector alone runs {masks['detector_single_images_per_s']:.1f} and SAM-HQ alone "
        f"{masks['segmenter_single_images_per_s']:.1f} images/s, i.e. {masks_h200:.2f} GPU-h for "
        f"{_n(work['mask_images'])} images on that card; not in the H100 total.",
        "- Detection (OWLv2 for MultiGen, OWL-ViT for VISOR), Attend-and-Excite sampling and editing have no GPU "
        "measurement: nothing is estimated for them here. Small stages (`grounding_eval`, `attention_maps`, "
        "`piebench`) are not listed.",
        f"- `--num_processes {PROCESSES}` (`launcher=accelerate launch --multi_gpu --num_processes "
        f"{PROCESSES}`): every GPU stage splits its work by rank, so the ideal is the total divided by "
        f"{PROCESSES}; launch, model loading, the slowest rank and (training) gradient all-reduce make the real "
        "figure higher. Training on 8 processes also multiplies the effective batch by 8 unless "
        "`batch_size`/`grad_accum` are lowered.",
        "",
        "## Achieved TFLOP/s and MFU",
        "",
        "FLOPs per training sample or per sampled image are counted by `torch.utils.flop_counter.FlopCounterMode` "
        "on the meta device at each variant's shapes (`bench/flops.py`: text encoder, VAE encoder when latents "
        "are not cached, UNet forward and backward for a training step; per image, the text encoder for the "
        "prompt and the empty negative prompt, the UNet at each of PNDM's evaluations on the doubled "
        "classifier-free-guidance batch, the VAE decoder). Model FLOPs: gradient checkpointing's recomputed "
        "forward is not counted. Achieved TFLOP/s = FLOPs per item × items/s; MFU = achieved / the dense peak "
        "of `bench/flops.py` `PEAK_TFLOPS` (NVIDIA's datasheets) for the variant's precision. For fp32 "
        "variants the peak is that of the op mix under torch's defaults: convolutions on TF32 tensor cores "
        "(cuDNN), matmuls in FP32, each at its own peak. `python bench/mfu.py` writes these fields into the "
        "results; the CUDA bench runs write them themselves.",
        "",
    ]
    for file, results in ((TRAIN_FILE, train), (SAMPLING_FILE, sampling), *others.items()):
        name = results.get("device_name") or results["device"]
        lines += [f"`bench/results/{file}` ({name}):", "", *mfu_table(results, file), ""]
    return "\n".join(lines)


def generate() -> str:
    """docs/cost.md from the repository's params.yaml and results."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return render(params, load(TRAIN_FILE), load(SAMPLING_FILE), load(MASKS_FILE),
                  {f: load(f) for f in OTHER_FILES})


def main() -> None:
    """Write docs/cost.md (or ``--out``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DOC)
    args = p.parse_args()
    args.out.write_text(generate())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

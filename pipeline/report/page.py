"""The whole page: every section in order, read from the pipeline's outputs, and the profile banner."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.report.blocks import Figure, Section, Text, missing
from pipeline.report.comparisons import by_step_section, differences_section, summary_section
from pipeline.report.photorealism import photorealism_section
from pipeline.report.sections import (categories_section, grounding_section, multigen_section, piebench_section,
                                      read_category_tables, training_section, visor_section)


def read_metrics(directory: str | Path) -> dict[str, dict[str, Any]]:
    """``{stem: contents}`` of every ``*.json`` in ``directory`` (empty when the folder is absent)."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def profile_banner(profile: str) -> str:
    """The line at the top of the page that says how far the numbers can be trusted."""
    if profile == "demo":
        return ("Profile demo: tiny embedded models with random weights and synthetic data. The numbers on "
                "this page are meaningless; they only show that every code path of the pipeline runs.")
    return (f"Profile {profile}: numbers computed with the model references and data listed under each "
            "table; compare with the published rows only where the settings match.")


def figures_section(title: str, paths: Sequence[Path], intro: str, missing_note: Text | None = None) -> Section:
    """A section of PNG files, each shown with its file path as caption."""
    section = Section(title, [Text(intro)])
    if not paths and missing_note is not None:
        section.blocks.append(missing_note)
    for path in paths:
        section.blocks.append(Figure(str(path), Path(path).read_bytes(), _figure_name(path)))
    return section


def _prompt_then_model(path: Path) -> tuple[int, str, str]:
    """Sort key of ``plots/attention/<model>_<i>.png``: prompt ``i`` first, so each prompt's figures of the
    different models sit next to each other; other names last, by name."""
    model, _, index = path.stem.rpartition("_")
    return (int(index), model, path.name) if index.isdigit() and model else (1 << 30, path.stem, path.name)


def _figure_name(path: Path) -> str:
    """File name of a copied figure in ``figures/``: its folder and name, other characters as ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(Path(path).parts[-2:]))


def build_sections(root: str | Path, published: Mapping[str, Any], profile: str, decimals: int = 2,
                   matches: Mapping[str, Sequence[str]] | None = None) -> list[Section]:
    """Every section of the page, read from the pipeline's outputs under ``root`` (the repository);
    ``matches``: this run's model -> the published MultiGen rows (method names) it reproduces."""
    root = Path(root)
    compare = root / "metrics" / "compare.json"
    compare = json.loads(compare.read_text()) if compare.is_file() else None
    multigen = read_metrics(root / "metrics" / "multigen")
    mg_published = ([{**row, "source": "TokenCompose README"} for row in published["multigen"]["rows"]]
                    + [{**row, "source": "study Table 1"} for row in published["study"]["multigen"]["rows"]])
    train = root / "metrics" / "train.json"
    edits = sorted((root / "plots" / "edits").glob("*.png"))
    attention = sorted((root / "plots" / "attention").glob("*.png"), key=_prompt_then_model)
    samples = sorted((root / "plots" / "samples").glob("*.png"))
    return [
        summary_section(compare, multigen, mg_published, matches or {}, decimals),
        multigen_section(multigen, published["multigen"], profile, decimals, published["study"]),
        figures_section("Generated images side by side", samples,
                        "One image (sample_grid.image_index) of each of the first prompts of each MultiGen set and "
                        "of the SR2D spatial prompts, one row per model: every row starts from the same noise, so "
                        "rows differ only by the model. Under each image, the detector's verdict: for MultiGen, how "
                        "many of the prompt's objects were found above the threshold and which were missed; for "
                        "SR2D, which objects were found and whether the relation holds (plots/samples/<set>.png).",
                        missing("Sample grids", "plots/samples/<set>.png", "sample_grid")),
        categories_section(read_category_tables(root / "plots" / "multigen_categories")),
        visor_section(read_metrics(root / "metrics" / "visor"), published["visor"], published["multigen"], profile,
                      decimals),
        photorealism_section(read_metrics(root / "metrics" / "fid"), read_metrics(root / "metrics" / "latency"),
                             multigen, published["multigen"], profile, decimals),
        piebench_section(read_metrics(root / "metrics" / "piebench"), published["piebench"], profile, decimals,
                         published["study"]),
        differences_section(compare, decimals),
        figures_section("Edit panels", edits, "Blended Latent Diffusion edits per backbone "
                        "(plots/edits/<backbone>.png: source, mask, edit).",
                        missing("Edit panels", "plots/edits/<backbone>.png", "piebench")),
        training_section(json.loads(train.read_text()) if train.is_file() else None,
                         root / "plots" / "train_curves.csv"),
        by_step_section(root / "plots" / "by_step.csv"),
        figures_section("Cross-attention maps", attention,
                        "Per-token cross-attention (averaged over heads and the layers of each resolution group, "
                        "upsampled to the image) at chosen denoising steps, base and trained model with the same "
                        "seed; one row per word token, one column per step (study Figures 3, 4, 8).",
                        missing("Attention figures", "plots/attention/<model>_<i>.png", "attention_maps")),
        grounding_section(read_metrics(root / "metrics" / "grounding")),
    ]

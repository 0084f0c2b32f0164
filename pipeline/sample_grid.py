"""Generated images of several models side by side, with the detector's verdict under each.

One figure per prompt set: one row per evaluated model, one column per prompt, the same image index in
every cell. Image ``j`` of prompt ``p`` has the same seed for every model (``pipeline.sampling``), so the
rows start from the same noise and differ only by the model. Under each image, the detector's verdict by
the rule its benchmark scores with: for MultiGen, how many of the prompt's objects were found above
``multigen.threshold`` (what MG1-MG5 count) and which were missed (:func:`multigen_verdict`); for VISOR's
spatial prompts, which objects were found and whether the relation holds (:func:`spatial_verdict`). An image
that is missing or failed is a grey cell whose caption says so; nothing is left out silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from pipeline.config import Bounds, ConfigError, NonNegativeInt, PositiveInt
from pipeline.datasets.multigen_files import MultiGenPrompt
from pipeline.figures import image_grid
from pipeline.multigen.found import found_names
from pipeline.store.codecs import image_from_bytes
from pipeline.store.shards import STATUS_OK, read_table, shard_files
from pipeline.visor import SpatialPrompt, image_outcome


@dataclass(frozen=True)
class SampleGridCfg:
    """Top-level ``sample_grid`` params."""

    models: tuple[str, ...] | None = None      # keys of eval_models, one row each; None: all, in params order
    num_prompts: PositiveInt = 6                # the first prompts of each set, one column each
    image_index: NonNegativeInt = 0             # which image of each prompt (the same seed for every model)
    cell_size: Annotated[int, Bounds(low=32)] = 192   # pixels per image cell


@dataclass(frozen=True)
class GridCell:
    """One cell: the image resized to the cell, (size, size, 3) uint8, or ``None``, and its caption."""

    image: np.ndarray | None
    caption: str


def grid_models(cfg: SampleGridCfg, eval_models: Iterable[str]) -> list[str]:
    """The models of the rows: ``cfg.models`` checked against the keys of ``eval_models``, or all of them."""
    known = list(eval_models)
    if cfg.models is None:
        return known
    if not cfg.models:
        raise ConfigError("sample_grid.models: empty; list keys of eval_models, or null for all of them")
    repeated = sorted({m for m in cfg.models if cfg.models.count(m) > 1})
    if repeated:
        raise ConfigError(f"sample_grid.models: {repeated} listed more than once")
    unknown = [m for m in cfg.models if m not in known]
    if unknown:
        raise ConfigError(f"sample_grid.models: {unknown} are not keys of eval_models {known}")
    return list(cfg.models)


def multigen_verdict(objects: Sequence[str], label_max_scores: Sequence[float], threshold: float) -> str:
    """``"3/5 found; missed: kite, boat"``: the count MG_k uses (:func:`pipeline.multigen.found_names`,
    distinct objects whose best box scores above ``threshold``) and the objects it did not find."""
    hits = found_names(objects, label_max_scores, threshold)
    names = list(dict.fromkeys(objects))
    missed = [name for name in names if name not in hits]
    return f"{len(hits)}/{len(names)} found" + (f"; missed: {', '.join(missed)}" if missed else "")


def spatial_verdict(prompt: SpatialPrompt, row: Mapping[str, Any], threshold: float) -> str:
    """``"both found; relation holds"`` (or ``fails``), or ``"missed: dog"``: VISOR's outcome of one image
    (:func:`pipeline.visor.image_outcome`) from the boxes of a detection row."""
    found_a, found_b, right = image_outcome(prompt.relation, row["box_scores"], row["box_labels"],
                                            row["box_centers"], threshold)
    if found_a and found_b:
        return f"both found; relation {'holds' if right else 'fails'}"
    missed = [name for name, found in zip(prompt.objects, (found_a, found_b)) if not found]
    return f"missed: {', '.join(missed)}"


@dataclass(frozen=True)
class VerdictRule:
    """How a detection row (status ok) becomes a cell caption: ``caption(prompt, row)``, reading ``columns``."""

    caption: Callable[[Any, Mapping[str, Any]], str]
    columns: tuple[str, ...]


def multigen_rule(threshold: float) -> VerdictRule:
    """:func:`multigen_verdict` of a MultiGen detection row."""
    return VerdictRule(lambda prompt, row: multigen_verdict(row["objects"], row["label_max_scores"], threshold),
                       ("objects", "label_max_scores"))


def spatial_rule(threshold: float) -> VerdictRule:
    """:func:`spatial_verdict` of a VISOR detection row (boxes kept with their centres)."""
    return VerdictRule(lambda prompt, row: spatial_verdict(prompt, row, threshold),
                       ("box_scores", "box_labels", "box_centers"))


def _rows_by_prompt(directory: Path, columns: list[str], prompt_ids: Sequence[int], image_index: int
                    ) -> dict[int, dict[str, Any]]:
    """Rows of image ``image_index`` of the prompts ``prompt_ids`` in a shard directory, keyed by prompt id.

    Each shard's keys are read first, and ``columns`` only from the shards holding a wanted row, until all
    are found: VISOR's shards follow a seeded prompt order, so their id ranges cannot rule a shard out, and
    reading every image of a paper-scale run to draw a few dozen would cost gigabytes."""
    wanted, rows = set(prompt_ids), {}
    filters = [("prompt_id", "in", list(wanted)), ("image_index", "=", image_index)]
    for f in shard_files(directory):
        if len(read_table(f, ["prompt_id"], filters)):
            rows.update((row["prompt_id"], row) for row in read_table(f, columns, filters).to_pylist())
        if wanted <= rows.keys():
            break
    return rows


def _resized(png: bytes, size: int) -> np.ndarray:
    """A PNG decoded and resized (bicubic) to (size, size, 3) uint8."""
    return np.asarray(image_from_bytes(png).resize((size, size), Image.Resampling.BICUBIC))


def grid_cells(sample_dir: Path, detection_dir: Path, prompts: Sequence[MultiGenPrompt], image_index: int,
               size: int, rule: VerdictRule) -> list[GridCell]:
    """One cell per prompt, in order: image ``image_index`` from ``sample_dir``, captioned by ``rule``
    (:func:`multigen_rule` or :func:`spatial_rule`) from its row in ``detection_dir``. A failed or missing
    sample, an image that does not decode and a missing or failed detection are captioned with the reason."""
    ids = [p.prompt_id for p in prompts]
    samples = _rows_by_prompt(sample_dir, ["prompt_id", "image", "status"], ids, image_index)
    detections = _rows_by_prompt(detection_dir, ["prompt_id", "status", *rule.columns], ids, image_index)
    cells = []
    for p in prompts:
        sample, detection = samples.get(p.prompt_id), detections.get(p.prompt_id)
        if sample is None or sample["status"] != STATUS_OK:
            cells.append(GridCell(None, "not sampled" if sample is None else f"no image: {sample['status']}"))
            continue
        try:
            image = _resized(sample["image"], size)
        except Exception as err:  # noqa: BLE001 - PIL raises several types for bad bytes; shown in the cell
            cells.append(GridCell(None, f"image does not decode: {type(err).__name__}"))
            continue
        if detection is None:
            caption = "not detected"
        elif detection["status"] != STATUS_OK:
            caption = f"detection: {detection['status']}"
        else:
            caption = rule.caption(p, detection)
        cells.append(GridCell(image, caption))
    return cells


def sample_grid_figure(cells: Mapping[str, Sequence[GridCell]], prompts: Sequence[MultiGenPrompt], title: str
                       ) -> bytes:
    """The figure of one prompt set: ``cells`` maps each model (a row) to its cells, one per prompt."""
    models = list(cells)
    return image_grid([[c.image for c in cells[m]] for m in models], [[c.caption for c in cells[m]] for m in models],
                      models, [f"#{p.prompt_id}: {p.text}" for p in prompts], title)

"""VISOR on SR2D: object accuracy and spatial-relationship scores (SPEC §3.6).

* Prompts: SR2D as VISOR builds it (``microsoft/VISOR`` ``create_spatial_phrases.py``, commit 044c8ce4).
  Over every unordered pair of the 80 COCO names (COCO order, ``data/categories/coco.txt``): for each
  relation in :data:`RELATIONS`, "A rel B" then "B rel A"; then "A and B", "B and A"; after all pairs, one
  single-object prompt per name. ``unique_id`` = position: 3,160 pairs x 10 + 80 = 31,680 prompts. Names
  take "a" or "an". The scores use the 25,280 two-object prompts with a spatial relation.
* Detection (VISOR's ``text2image_realtime_evaluate.ipynb``): OWL-ViT (``google/owlvit-base-patch32``)
  with the queries ``"a photo of a {A}"``, ``"a photo of a {B}"``; a box is kept when its score (sigmoid of
  its best query logit) is > 0.1 and is labelled with that best query; its centre is the box centre.
* Scores (VISOR's ``visor.py``), in percent over the scored images:
  OA = both objects detected; OA(A), OA(B) = that object detected; an image is *spatially right* when
  both are detected and some (A box, B box) pair has its centres in the prompt's relation ("to the left
  of": x_A < x_B; "to the right of": x_A > x_B; "above": y_A < y_B; "below": y_A > y_B, y downwards);
  VISOR_cond = right / both-detected; VISOR_uncond = right / all (= VISOR_cond x OA / 100);
  VISOR_k = share of prompts with at least k spatially right images.

TokenCompose's README quotes VISOR's OA for SD1.4 (29.86) and reports OA for its own model, so OA is the
published number this module reproduces; the others come at no extra cost from the same detections.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline.config import Fraction, FractionBelowOne, PositiveInt
from pipeline.datasets.multigen_files import MultiGenPrompt
from pipeline.multigen.found import above_threshold
from pipeline.multigen.settings import MultiGenCfg, MultiGenScale
from pipeline.seeding import numpy_rng

RELATIONS = ("to the left of", "to the right of", "above", "below")
SR2D_SIZE = 31_680          # every SR2D prompt (VISOR's text_spatial_rel_phrases.json)
SPATIAL_SIZE = 25_280       # the two-object prompts with a spatial relation (the ones scored)
PROMPT_SET = "sr2d"         # the prompt-set name in seeds and folders


@dataclass(frozen=True)
class VisorCfg:
    """Top-level ``visor`` params: the VISOR protocol, the same in every profile."""

    threshold: FractionBelowOne = 0.1
    query_template: str = "a photo of a {name}"
    images_per_prompt: PositiveInt = 4
    max_failed_rate: Fraction = 0.01        # the stage fails when more images than this failed

    def __post_init__(self) -> None:
        MultiGenCfg(query_template=self.query_template)  # the same check of the {name} placeholder


@dataclass(frozen=True)
class VisorScale:
    """``profiles.<p>.visor``: how many prompts are sampled and how detection runs."""

    detection: MultiGenScale                # detector, batch_size, dtype, shard_size (as ``multigen``)
    max_prompts: PositiveInt | None = None  # None: all 25,280; else the first N of a seeded random order


@dataclass(frozen=True)
class SpatialPrompt(MultiGenPrompt):
    """A two-object SR2D prompt: ``objects`` = (A, B) and ``relation`` one of :data:`RELATIONS`."""

    relation: str = ""


def with_article(name: str) -> str:
    """``"an apple"``, ``"a person"``: the indefinite article of a COCO name (all 80 follow the vowel rule)."""
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def sr2d_entries(names: Sequence[str]) -> list[dict[str, Any]]:
    """Every SR2D prompt in VISOR's order and file format (``unique_id`` = list index).

    Entries: ``unique_id``, ``num_objects``, ``obj_1_attributes`` [A], ``obj_2_attributes`` [B or None],
    ``rel_type`` (a relation, ``"and"`` or ``"single"``), ``text``.
    """
    entries: list[dict[str, Any]] = []

    def add(a: str, b: str | None, rel: str) -> None:
        text = with_article(a) if b is None else f"{with_article(a)} {rel} {with_article(b)}"
        entries.append({"unique_id": len(entries), "num_objects": 1 if b is None else 2,
                        "obj_1_attributes": [a], "obj_2_attributes": [b], "rel_type": rel, "text": text})

    for a, b in itertools.combinations(names, 2):
        for rel in RELATIONS:
            add(a, b, rel)
            add(b, a, rel)
        add(a, b, "and")
        add(b, a, "and")
    for name in names:
        add(name, None, "single")
    return entries


def spatial_prompts(names: Sequence[str], max_prompts: int | None = None, seed: int = 0) -> list[SpatialPrompt]:
    """The scored SR2D prompts (two objects, a spatial relation), ``prompt_id`` = VISOR ``unique_id``.

    The prompts come in a random order drawn from ``seed`` (the file is ordered by object pair, so its first
    N would cover only the first few names); ``max_prompts`` keeps the first N of that order (all when
    None). Subsets are nested: a larger ``max_prompts``, or None, extends a smaller one, and the images
    already sampled are kept.
    """
    prompts = [SpatialPrompt(e["unique_id"], e["text"], (e["obj_1_attributes"][0], e["obj_2_attributes"][0]),
                             e["rel_type"])
               for e in sr2d_entries(names) if e["num_objects"] == 2 and e["rel_type"] in RELATIONS]
    order = numpy_rng(seed, "visor", "subset").permutation(len(prompts))
    return [prompts[i] for i in order[:max_prompts]]


# --- each image's verdict (scores over images: pipeline.visor_scoring) --------------------------------

def relation_holds(relation: str, centers_a: np.ndarray, centers_b: np.ndarray) -> bool:
    """Whether some (A box, B box) pair has its centres in ``relation`` (VISOR's any-pair rule).

    Args:
        centers_a: (Na, 2) (x, y) centres of the kept A boxes; centers_b: (Nb, 2) of the B boxes.
    """
    if len(centers_a) == 0 or len(centers_b) == 0:
        return False
    (xa, ya), (xb, yb) = np.asarray(centers_a, float).T, np.asarray(centers_b, float).T
    if relation == "to the left of":
        return bool(xa.min() < xb.max())
    if relation == "to the right of":
        return bool(xa.max() > xb.min())
    if relation == "above":
        return bool(ya.min() < yb.max())
    if relation == "below":
        return bool(ya.max() > yb.min())
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def image_outcome(relation: str, box_scores: Sequence[float], box_labels: Sequence[int],
                  box_centers: Sequence[Sequence[float]], threshold: float) -> tuple[bool, bool, bool]:
    """(A detected, B detected, spatially right) of one image from all its boxes.

    Args:
        box_scores: (N,) scores; box_labels: (N,) query index, 0 = A, 1 = B; box_centers: (N, 2).
    """
    scores, labels = np.asarray(box_scores, float), np.asarray(box_labels, int)
    centers = np.asarray([tuple(c) for c in box_centers], float).reshape(-1, 2)  # lists or arrays of pairs
    if not (len(scores) == len(labels) == len(centers)):
        raise ValueError(f"{len(scores)} scores, {len(labels)} labels and {len(centers)} centres differ")
    kept = above_threshold(scores, threshold)
    in_a, in_b = kept & (labels == 0), kept & (labels == 1)
    found_a, found_b = bool(in_a.any()), bool(in_b.any())
    right = found_a and found_b and relation_holds(relation, centers[in_a], centers[in_b])
    return found_a, found_b, right

"""The synthetic demo training set: captioned images of simple drawn objects with their exact masks.

The demo profile trains and evaluates on pictures the project draws itself (DESIGN §2), so the whole DAG
runs offline in minutes. Each image shows 2-4 objects from :data:`~pipeline.datasets.demo_drawing.NOUNS`
(single nouns in CLIP's vocabulary), each in its own cell of a grid so objects never overlap, on a vertical
gradient background (:mod:`pipeline.datasets.demo_drawing`, whose drawing is exact, so each object's mask
is its drawn pixels). Every draw comes from a generator seeded from (seed, image id), so any image
reproduces alone. Only the ``train_data`` stage (``source: demo``) runs this module.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.datasets.demo_drawing import BACKGROUNDS, NOUNS, PALETTE, draw_object, gradient, paint
from pipeline.seeding import numpy_rng, python_rng
from pipeline.store.codecs import png_bytes, rle_encode, undecodable_images
from pipeline.store.identity import code_digest
from pipeline.store.shards import STATUS_OK, write_shards

log = logging.getLogger(__name__)

PLURALS = {"ball": "balls", "box": "boxes", "tree": "trees", "house": "houses", "car": "cars",
           "cup": "cups", "kite": "kites", "star": "stars", "flower": "flowers", "boat": "boats"}
SIZE_WORDS = {"small": 0.62, "big": 0.88}  # scale below "small"'s bound / above "big"'s bound

DEFAULT_SIZE = 128  # shorter side of the demo training images
MIN_SCALE, MAX_SCALE = 0.55, 0.95  # object side as a fraction of its cell's shorter side


@dataclass(frozen=True)
class DrawnObject:
    """One named object of a demo image.

    ``name`` is the word as it appears in the caption (``"kites"`` for two kites); ``mask`` is (H, W)
    bool and covers every drawn pixel of all its instances.
    """

    noun: str
    name: str
    colour: str
    size_word: str
    cells: tuple[tuple[int, int], ...]
    mask: np.ndarray


@dataclass(frozen=True)
class DemoImage:
    """A rendered demo image: ``pixels`` (H, W, 3) uint8, its caption and its objects."""

    image_id: str
    pixels: np.ndarray
    caption: str
    objects: tuple[DrawnObject, ...]


# --- captioned training images ---------------------------------------------------------------------

def image_id_of(index: int) -> str:
    """Stable id of demo image ``index`` (``demo00007``)."""
    return f"demo{index:05d}"


def _frame(rng: np.random.Generator, image_size: int) -> tuple[int, int, int, int]:
    """(height, width, grid rows, grid cols): square 2x2, landscape 2x3 or portrait 3x2."""
    long_side = round(image_size * 5 / 4)
    kind = rng.choice(["square", "square", "landscape", "portrait"])
    if kind == "landscape":
        return image_size, long_side, 2, 3
    if kind == "portrait":
        return long_side, image_size, 3, 2
    return image_size, image_size, 2, 2


def _cell_boxes(height: int, width: int, rows: int, cols: int) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of each grid cell (x1, y1 exclusive), row-major."""
    ys = np.linspace(0, height, rows + 1).round().astype(int)
    xs = np.linspace(0, width, cols + 1).round().astype(int)
    return [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(rows) for c in range(cols)]


def _place(rng: np.random.Generator, cell: tuple[int, int, int, int], scale: float) -> tuple[int, int, int]:
    """A square box (x0, y0, side) of ``scale`` times the cell's shorter side, inside the cell."""
    x0, y0, x1, y1 = cell
    side = max(4, int(scale * min(x1 - x0, y1 - y0)))
    ox = int(rng.integers(0, x1 - x0 - side + 1))
    oy = int(rng.integers(0, y1 - y0 - side + 1))
    return x0 + ox, y0 + oy, side


def _size_word(scale: float) -> str:
    if scale < SIZE_WORDS["small"]:
        return "small"
    if scale > SIZE_WORDS["big"]:
        return "big"
    return ""


def render_image(image_id: str, seed: int, image_size: int = DEFAULT_SIZE) -> DemoImage:
    """Draw demo image ``image_id``: 2-4 distinct objects, a caption naming each, exact masks.

    The image is (image_size, image_size), (image_size, 5/4 image_size) or the portrait transpose.
    All randomness comes from ``numpy_rng(seed, "demo_image", image_id)``.
    """
    rng = numpy_rng(seed, "demo_image", image_id)
    height, width, rows, cols = _frame(rng, image_size)
    top, bottom = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    pixels = gradient(height, width, top, bottom)
    cells = _cell_boxes(height, width, rows, cols)
    k = int(rng.integers(2, min(4, len(cells)) + 1))
    nouns = [str(n) for n in rng.choice(NOUNS, size=k, replace=False)]
    colours = [str(c) for c in rng.choice(list(PALETTE), size=k, replace=False)]
    order = [int(i) for i in rng.permutation(len(cells))]
    spare = len(cells) - k
    objects = []
    for noun, colour in zip(nouns, colours):
        count = 2 if spare > 0 and rng.random() < 0.3 else 1
        spare -= count - 1
        chosen, order = order[:count], order[count:]
        scale = float(rng.uniform(MIN_SCALE, MAX_SCALE))
        mask = np.zeros((height, width), bool)
        for cell in chosen:
            body, accent = draw_object(noun, height, width, _place(rng, cells[cell], scale))
            paint(pixels, body, accent, PALETTE[colour])
            mask |= body | accent
        name = PLURALS[noun] if count == 2 else noun
        grid = tuple(divmod(c, cols) for c in chosen)
        objects.append(DrawnObject(noun, name, colour, _size_word(scale), grid, mask))
    caption = make_caption(objects, python_rng(seed, "demo_caption", image_id))
    return DemoImage(image_id, pixels, caption, tuple(objects))


# --- captions --------------------------------------------------------------------------------------

def noun_phrase(obj: DrawnObject) -> str:
    """``"a small red ball"`` / ``"two blue kites"``."""
    words = ["two" if obj.name != obj.noun else "a", obj.size_word, obj.colour, obj.name]
    return " ".join(w for w in words if w)


def relation(a: DrawnObject, b: DrawnObject) -> str:
    """Spatial word(s) true of ``a`` relative to ``b`` from their grid rows."""
    rows_a = [r for r, _ in a.cells]
    rows_b = [r for r, _ in b.cells]
    if max(rows_a) < min(rows_b):
        return "above"
    if min(rows_a) > max(rows_b):
        return "below"
    if len(set(rows_a + rows_b)) == 1:
        return "next to"
    return "near"


TEMPLATES: dict[int, tuple[str, ...]] = {
    2: ("{A} {rel} {B}.", "there {be} {A} {rel} {B}.", "{A} and {B}."),
    3: ("{A} {rel} {B} and {C}.", "{A}, {B} and {C}.", "there {be} {A} {rel} {B}, and {C}."),
    4: ("{A}, {B}, {C} and {D}.", "{A} {rel} {B}, with {C} and {D}."),
}


def make_caption(objects: list[DrawnObject], rng: random.Random) -> str:
    """A COCO-style sentence naming every object once, e.g. ``"A red ball next to a green tree."``."""
    phrases = [noun_phrase(o) for o in objects]
    template = rng.choice(TEMPLATES[len(objects)])
    text = template.format(
        **dict(zip("ABCD", phrases)),
        rel=relation(objects[0], objects[1]),
        be="are" if objects[0].name != objects[0].noun else "is",
    )
    return text[0].upper() + text[1:]


# --- training set ----------------------------------------------------------------------------------

def heldout_ids(image_ids: list[str], fraction: float, seed: int) -> set[str]:
    """The ``round(len * fraction)`` ids (at least one when ``fraction > 0``) held out from training."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    count = round(len(image_ids) * fraction)
    if fraction > 0 and image_ids:
        count = max(1, count)
    return set(python_rng(seed, "heldout").sample(sorted(image_ids), count))


def image_row(image: DemoImage, split: str) -> dict[str, Any]:
    """The ``artifacts/data/images`` row of a rendered image (PNG bytes, RLE masks at image size)."""
    return {
        "image_id": image.image_id,
        "image": png_bytes(image.pixels),
        "caption": image.caption,
        "split": split,
        "objects": [{"name": o.name, "mask": rle_encode(o.mask)} for o in image.objects],
        "status": STATUS_OK,
        "error": "",
    }


def write_demo_training_set(out_dir: Path, num_images: int, image_size: int, seed: int,
                            shard_size: int, heldout_fraction: float) -> list[Path]:
    """Render ``num_images`` demo images into the shard directory ``out_dir`` (resumable).

    Rows follow the ``artifacts/data/images`` contract (preamble): image_id, image (PNG), caption,
    split ("train" | "heldout"), objects [{name, mask RLE}], status, error. A rerun verifies the finished
    shards (page checksums, every PNG decoded: :func:`~pipeline.store.codecs.undecodable_images`, well under a
    second for the 48 demo images) and draws damaged ones again.
    """
    ids = [image_id_of(i) for i in range(num_images)]
    held = heldout_ids(ids, heldout_fraction, seed)

    def process(chunk: list[str]) -> list[dict[str, Any]]:
        return [image_row(render_image(i, seed, image_size), "heldout" if i in held else "train")
                for i in chunk]

    fingerprint = {"source": "demo", "num_images": num_images, "image_size": image_size, "seed": seed,
                   "heldout_fraction": heldout_fraction}
    log.info("drawing %d demo images (%d held out) into %s", num_images, len(held), out_dir)
    return write_shards(Path(out_dir), ids, process, shard_size, fingerprint, code=code_digest(__name__),
                        desc="demo images", verify=undecodable_images)

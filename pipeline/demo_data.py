"""Synthetic demo data: captioned images of simple drawn objects with their exact masks.

The demo profile trains and evaluates on pictures the project draws itself (DESIGN §2), so the whole DAG
runs offline in minutes. Each image shows 2-4 objects from :data:`NOUNS` (single nouns in CLIP's
vocabulary), each in its own cell of a grid so objects never overlap, on a vertical gradient background.
Every draw comes from a generator seeded from (seed, image id), so any image reproduces alone.

Because the drawing is exact (no anti-aliasing), each object's mask is its drawn pixels: inside the mask a
pixel has the object's body colour or the shared dark :data:`ACCENT` colour, outside every mask it has the
background colour of its row, and no palette colour is ever a background colour (all background channels
are >= 170, every palette colour has a channel <= 90).

The same drawing code makes the editing scenes of the demo PIE-Bench set (:func:`render_edit_scene`):
one object standing on a table, whose mask is the region to edit.

Caption vocabulary (also listed in docs/data.md for the tagger corpus): :data:`VOCABULARY`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

from pipeline.datasets.piebench_files import (
    EDITING_TYPES, IMAGES_DIR, MAPPING_FILE, PIE_SIZE, PieBenchEntry, encode_mask, write_mapping,
)
from pipeline.config import Pixels, PositiveInt
from pipeline.seeding import numpy_rng, python_rng
from pipeline.store.shards import STATUS_OK, write_shards
from pipeline.store.identity import code_digest
from pipeline.store.codecs import png_bytes, rle_encode

log = logging.getLogger(__name__)

# Body colours: every one has a channel <= 90, so none can equal a background colour (channels >= 170).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 195, 30),
    "purple": (140, 60, 190),
    "pink": (235, 90, 170),
    "brown": (140, 90, 40),
}
ACCENT = (50, 50, 50)  # wheels, trunks, roofs, handles, masts: part of the object's mask
TABLE_COLOUR = (120, 85, 50)  # the table of the editing scenes (not an object to edit)
# (top, bottom) colours of the vertical background gradients; every channel in [170, 250].
BACKGROUNDS = (
    ((245, 245, 240), (205, 200, 190)),
    ((200, 225, 250), (240, 245, 250)),
    ((235, 230, 210), (190, 185, 175)),
    ((225, 240, 225), (180, 200, 185)),
    ((230, 230, 230), (230, 230, 230)),
)

NOUNS = ("ball", "box", "tree", "house", "car", "cup", "kite", "star", "flower", "boat")
PLURALS = {"ball": "balls", "box": "boxes", "tree": "trees", "house": "houses", "car": "cars",
           "cup": "cups", "kite": "kites", "star": "stars", "flower": "flowers", "boat": "boats"}
SIZE_WORDS = {"small": 0.62, "big": 0.88}  # scale below "small"'s bound / above "big"'s bound
# Every word the captions and editing prompts use, by part of speech (for the tagger corpus).
VOCABULARY: dict[str, tuple[str, ...]] = {
    "NN": NOUNS + ("table",),
    "NNS": tuple(PLURALS[n] for n in NOUNS),
    "JJ": tuple(PALETTE) + tuple(SIZE_WORDS) + ("next",),
    "DT": ("a",),
    "CD": ("two",),
    "CC": ("and",),
    "IN": ("above", "below", "near", "with", "on"),
    "TO": ("to",),
    "EX": ("there",),
    "VBZ": ("is",),
    "VBP": ("are",),
}

DEFAULT_SIZE = 128  # shorter side of the demo training images
MIN_SCALE, MAX_SCALE = 0.55, 0.95  # object side as a fraction of its cell's shorter side


@dataclass(frozen=True)
class DemoDataScale:
    """``profiles.<p>.demo_data``: sizes of the synthetic demo sets."""

    num_images: PositiveInt  # captioned training images
    image_size: Pixels  # shorter side in pixels; non-square images are 5/4 as long
    num_prompts: PositiveInt  # prompts per generated MultiGen set
    num_edits: PositiveInt  # editing examples in the demo PIE-Bench set


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


@dataclass(frozen=True)
class EditScene:
    """One demo editing example: ``pixels`` (S, S, 3) uint8 and ``mask`` (S, S) bool over the object.

    Prompts carry PIE-Bench's bracket markup around the words that change; ``blended_word`` is
    ``"<source word> <target word>"``.
    """

    pixels: np.ndarray
    mask: np.ndarray
    editing_type_id: str
    original_prompt: str
    editing_prompt: str
    editing_instruction: str
    blended_word: str


# --- shapes ----------------------------------------------------------------------------------------

class _Canvas:
    """Binary body/accent layers of one object in a square box of side ``s`` at (x0, y0)."""

    def __init__(self, height: int, width: int, box: tuple[int, int, int]):
        self.x0, self.y0, self.s = box
        self.body_img = Image.new("L", (width, height), 0)
        self.accent_img = Image.new("L", (width, height), 0)
        self.body = ImageDraw.Draw(self.body_img)
        self.accent = ImageDraw.Draw(self.accent_img)

    def p(self, u: float, v: float) -> tuple[int, int]:
        """Pixel at relative position (u, v) in [0, 1]^2 of the box."""
        return (self.x0 + round(u * (self.s - 1)), self.y0 + round(v * (self.s - 1)))

    def rect(self, u0: float, v0: float, u1: float, v1: float) -> list[tuple[int, int]]:
        return [self.p(u0, v0), self.p(u1, v1)]

    def circle(self, u: float, v: float, r: float) -> list[tuple[int, int]]:
        return self.rect(u - r, v - r, u + r, v + r)

    def width(self, fraction: float) -> int:
        return max(1, round(fraction * self.s))

    def layers(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.body_img) > 0, np.asarray(self.accent_img) > 0


def _ball(c: _Canvas) -> None:
    c.body.ellipse(c.rect(0, 0, 1, 1), fill=1)


def _box(c: _Canvas) -> None:
    c.body.rectangle(c.rect(0.08, 0.2, 0.92, 0.98), fill=1)
    c.accent.rectangle(c.rect(0.08, 0.2, 0.92, 0.3), fill=1)


def _tree(c: _Canvas) -> None:
    c.body.polygon([c.p(0.5, 0.0), c.p(0.05, 0.75), c.p(0.95, 0.75)], fill=1)
    c.accent.rectangle(c.rect(0.42, 0.7, 0.58, 1.0), fill=1)


def _house(c: _Canvas) -> None:
    c.body.rectangle(c.rect(0.15, 0.45, 0.85, 1.0), fill=1)
    c.accent.polygon([c.p(0.5, 0.05), c.p(0.0, 0.45), c.p(1.0, 0.45)], fill=1)
    c.accent.rectangle(c.rect(0.42, 0.7, 0.58, 1.0), fill=1)


def _car(c: _Canvas) -> None:
    c.body.rectangle(c.rect(0.0, 0.45, 1.0, 0.8), fill=1)
    c.body.rectangle(c.rect(0.2, 0.2, 0.75, 0.45), fill=1)
    c.accent.ellipse(c.circle(0.25, 0.82, 0.14), fill=1)
    c.accent.ellipse(c.circle(0.75, 0.82, 0.14), fill=1)


def _cup(c: _Canvas) -> None:
    c.body.polygon([c.p(0.05, 0.2), c.p(0.7, 0.2), c.p(0.62, 0.95), c.p(0.13, 0.95)], fill=1)
    c.accent.ellipse(c.rect(0.55, 0.35, 0.95, 0.75), outline=1, width=c.width(0.08))


def _kite(c: _Canvas) -> None:
    c.body.polygon([c.p(0.5, 0.0), c.p(0.85, 0.35), c.p(0.5, 0.75), c.p(0.15, 0.35)], fill=1)
    c.accent.line([c.p(0.5, 0.75), c.p(0.62, 1.0)], fill=1, width=c.width(0.05))


def _star(c: _Canvas) -> None:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 0.5, 0.2)
    pts = [c.p(0.5 + r * np.cos(a), 0.55 + r * np.sin(a)) for r, a in zip(radii, angles)]
    c.body.polygon(pts, fill=1)


def _flower(c: _Canvas) -> None:
    c.accent.rectangle(c.rect(0.46, 0.5, 0.54, 1.0), fill=1)
    for a in -np.pi / 2 + np.arange(5) * 2 * np.pi / 5:
        c.body.ellipse(c.circle(0.5 + 0.22 * np.cos(a), 0.35 + 0.22 * np.sin(a), 0.13), fill=1)
    c.accent.ellipse(c.circle(0.5, 0.35, 0.1), fill=1)


def _boat(c: _Canvas) -> None:
    c.body.polygon([c.p(0.0, 0.7), c.p(1.0, 0.7), c.p(0.8, 0.97), c.p(0.2, 0.97)], fill=1)
    c.body.polygon([c.p(0.55, 0.08), c.p(0.55, 0.62), c.p(0.92, 0.62)], fill=1)
    c.accent.line([c.p(0.5, 0.05), c.p(0.5, 0.7)], fill=1, width=c.width(0.05))


SHAPES: dict[str, Callable[[_Canvas], None]] = {
    "ball": _ball, "box": _box, "tree": _tree, "house": _house, "car": _car,
    "cup": _cup, "kite": _kite, "star": _star, "flower": _flower, "boat": _boat,
}


def draw_object(noun: str, height: int, width: int, box: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise ``noun`` in the square ``box`` = (x0, y0, side) of an (H, W) frame.

    Returns (body, accent): two (H, W) bool layers; the object's mask is their union and accent pixels
    are painted over body pixels.
    """
    if noun not in SHAPES:
        raise ValueError(f"no drawing for {noun!r}; known objects: {', '.join(SHAPES)}")
    canvas = _Canvas(height, width, box)
    SHAPES[noun](canvas)
    return canvas.layers()


def gradient(height: int, width: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 3) uint8 vertical gradient from ``top`` to ``bottom``; every row has one colour."""
    t = np.linspace(0.0, 1.0, height)[:, None]
    rows = np.rint(np.asarray(top) * (1 - t) + np.asarray(bottom) * t).astype(np.uint8)
    return np.broadcast_to(rows[:, None, :], (height, width, 3)).copy()


def paint(pixels: np.ndarray, body: np.ndarray, accent: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Paint an object's layers into ``pixels`` (H, W, 3) in place: body in ``colour``, accent on top."""
    pixels[body] = colour
    pixels[accent] = ACCENT


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
    split ("train" | "heldout"), objects [{name, mask RLE}], status, error.
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
                        desc="demo images")


# --- editing scenes --------------------------------------------------------------------------------

DEMO_EDIT_TYPES = ("6", "1")  # change colour, change object (PIE-Bench editing_type_id), alternating


def render_edit_scene(index: int, seed: int, size: int = 512) -> EditScene:
    """Draw editing example ``index``: one object on a table, (size, size), mask over the object.

    Even indices change the object's colour (type "6"), odd ones replace the object (type "1").
    """
    rng = numpy_rng(seed, "demo_edit", index)
    top, bottom = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    pixels = gradient(size, size, top, bottom)
    table_top = round(0.66 * size)
    pixels[table_top : round(0.71 * size), round(0.08 * size) : round(0.92 * size)] = TABLE_COLOUR
    for x0 in (0.14, 0.80):
        pixels[round(0.71 * size) : round(0.97 * size), round(x0 * size) : round((x0 + 0.06) * size)] = TABLE_COLOUR
    noun, target = (str(n) for n in rng.choice(NOUNS, size=2, replace=False))
    colour, new_colour = (str(c) for c in rng.choice(list(PALETTE), size=2, replace=False))
    side = int(rng.integers(round(0.28 * size), round(0.42 * size)))
    x0 = int(rng.integers(round(0.1 * size), round(0.9 * size) - side))
    body, accent = draw_object(noun, size, size, (x0, table_top - side, side))
    paint(pixels, body, accent, PALETTE[colour])
    edit_type = DEMO_EDIT_TYPES[index % len(DEMO_EDIT_TYPES)]
    if edit_type == "6":
        prompts = (f"a [{colour}] {noun} on a table", f"a [{new_colour}] {noun} on a table",
                   f"Make the {noun} {new_colour}.", f"{noun} {noun}")
    else:
        prompts = (f"a {colour} [{noun}] on a table", f"a {colour} [{target}] on a table",
                   f"Replace the {noun} with a {target}.", f"{noun} {target}")
    return EditScene(pixels, body | accent, edit_type, *prompts)


def demo_image_path(index: int, editing_type_id: str) -> tuple[str, str]:
    """(12-digit id, path under annotation_images) of demo edit ``index``: artificial, indoor scene."""
    image_id = f"{editing_type_id}13{index:09d}"
    folder = EDITING_TYPES[editing_type_id][0]
    if editing_type_id == "0":
        return image_id, f"{folder}/{image_id}.jpg"
    return image_id, f"{folder}/1_artificial/3_indoor/{image_id}.jpg"


def write_demo_piebench(out_dir: Path, num_edits: int, seed: int, size: int = PIE_SIZE,
                        jpeg_quality: int = 95) -> dict[str, PieBenchEntry]:
    """Write ``num_edits`` drawn editing scenes in PIE-Bench layout (JPEG images + mapping_file.json)."""
    out_dir = Path(out_dir)
    entries = {}
    for index in range(num_edits):
        scene = render_edit_scene(index, seed, size)
        image_id, rel = demo_image_path(index, scene.editing_type_id)
        dest = out_dir / IMAGES_DIR / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.pixels).save(dest, format="JPEG", quality=jpeg_quality)
        entries[image_id] = PieBenchEntry(
            rel, scene.original_prompt, scene.editing_prompt, scene.editing_instruction,
            scene.editing_type_id, scene.blended_word, encode_mask(scene.mask))
    write_mapping(out_dir / MAPPING_FILE, entries)
    return entries

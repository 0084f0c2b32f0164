"""The demo editing benchmark: drawn scenes in PIE-Bench's layout (the ``edit_data`` stage, ``source: demo``).

Each scene shows one object standing on a table, drawn with :mod:`pipeline.datasets.demo_drawing`, so the
object's mask (the region to edit) is exact; its prompts change the object's colour or the object.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.datasets.demo_drawing import BACKGROUNDS, NOUNS, PALETTE, draw_object, gradient, paint
from pipeline.datasets.piebench_files import (EDITING_TYPES, IMAGES_DIR, MAPPING_FILE, PIE_SIZE, PieBenchEntry,
                                              encode_mask, write_mapping)
from pipeline.seeding import numpy_rng

TABLE_COLOUR = (120, 85, 50)  # the table of the editing scenes (not an object to edit)


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

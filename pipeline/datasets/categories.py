"""Category lists of the benchmarks (``data/categories/``): COCO's 80 and ADE20K's 100 class names."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import InputDataError, MissingInputError

CATEGORIES_DIR = Path(__file__).resolve().parents[2] / "data" / "categories"


def load_categories(name: str, directory: Path = CATEGORIES_DIR) -> list[str]:
    """The class names of MultiGen set ``name`` ("coco" or "ade20k"), one per line of its list file."""
    path = Path(directory) / f"{name}.txt"
    if not path.is_file():
        raise MissingInputError(f"{path}: category list not found; known sets: {', '.join(sorted(p.stem for p in Path(directory).glob('*.txt')))}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise InputDataError(f"{path}: duplicate class names")
    return names

"""The FID captions a reference set's models sample from: ``artifacts/data/fid/captions/<name>.json``.

Written by stage ``fid_data`` (pipeline.photorealism.references), read by ``fid_sample``; kept apart from the
reference sources so that editing how references are fetched reruns no sampling stage.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import MissingInputError

CAPTIONS_DIR = Path("artifacts/data/fid/captions")


def read_captions(name: str, captions_dir: Path = CAPTIONS_DIR) -> list[dict[str, str]]:
    """The captions of reference set ``name`` written by ``fid_data``; a clear error when absent."""
    path = captions_dir / f"{name}.json"
    if not path.is_file():
        raise MissingInputError(f"{path}: captions of reference set {name!r} not found; run `dvc repro fid_data`")
    return json.loads(path.read_text())["captions"]

"""The forms of a CLIP model reference in params (``clip_model``), checked when params are read.

Apart from :mod:`pipeline.clip_score` so that params dataclasses can check a reference without depending on
the scorer's code (a stage that only parses the params does not rerun when the scorer changes).
"""

from __future__ import annotations

from pathlib import Path

CLIP_REF_FORMS = ("clip_model {ref!r}: expected ARCH:TAG (e.g. ViT-L-14:openai), hf-hub:ORG/REPO, embedded:NAME "
                  "or an existing open_clip folder")


def check_clip_ref(ref: str) -> None:
    """``ValueError`` (for a params dataclass) unless ``ref`` has one of the forms :func:`open_clip_name` reads."""
    if ":" not in ref and not Path(ref).is_dir():  # every form but a local folder has a colon
        raise ValueError(CLIP_REF_FORMS.format(ref=ref))

"""Training records: one image with its caption and supervised words, and the fingerprint of a record set."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from pipeline.store.identity import fingerprint_of

MAX_TOKENS = 77  # CLIP's context: captions are padded or truncated to it


@dataclass
class WordTarget:
    """One supervised word: its phrase, token positions (SOT = 0) and training-resolution mask (RLE)."""

    phrase: str
    token_indices: list[int]
    train_mask: dict


@dataclass
class TrainRecord:
    """One training image with its caption and supervised words (possibly none)."""

    image_id: str
    image: bytes
    caption: str
    words: list[WordTarget] = field(default_factory=list)


def data_fingerprint(records: Sequence[TrainRecord]) -> str:
    """:func:`~pipeline.store.identity.fingerprint_of` the image ids, image bytes, captions and word targets."""
    return fingerprint_of([[r.image_id, r.image, r.caption, [asdict(w) for w in r.words]] for r in records])

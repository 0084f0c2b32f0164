"""Finding a run of items inside a sequence: token ids in a tokenized caption, words in a detector label."""

from __future__ import annotations

from typing import Any, Sequence


def subsequence_starts(seq: Sequence[Any], sub: Sequence[Any], start: int = 0) -> list[int]:
    """Every position ``>= start`` where ``sub`` occurs as a contiguous run of ``seq``, in order (none for an
    empty ``sub``). The one finder for token ids and for word lists."""
    n, target = len(sub), list(sub)
    return [i for i in range(start, len(seq) - n + 1) if list(seq[i : i + n]) == target] if n else []

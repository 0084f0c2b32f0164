"""The ``artifacts/masks`` row, and the phrases of an ``artifacts/nouns`` row: shared by both mask sources."""

from __future__ import annotations

from typing import Any, Sequence

from pipeline.store.shards import STATUS_OK


def masks_row(item: dict[str, Any], phrase: str, indices: Sequence[int], status: str, error: str = "",
              **fields: Any) -> dict[str, Any]:
    """One ``artifacts/masks`` row of nouns row ``item`` and ``phrase``: no mask, box or score unless given
    in ``fields`` (``mask``, ``train_mask``: COCO RLE; ``box``: xyxy pixels; ``score``)."""
    row = dict(image_id=str(item["image_id"]), caption=item.get("caption"), phrase=phrase,
               token_indices=[int(i) for i in indices], mask=None, train_mask=None, box=None, score=None,
               status=status, error=error)
    row.update(fields)
    return row


def phrase_entries(item: dict[str, Any]) -> list[tuple[str, list[int], str, str]]:
    """(phrase, token_indices, phrase_status, phrase_error) of a nouns row, tolerating missing columns."""
    def column(name: str, default: list[Any]) -> list[Any]:
        value = item.get(name)
        return default if value is None else list(value)  # lists, or arrays when read through pandas

    phrases = column("phrases", [])
    n = len(phrases)
    indices = column("token_indices", [[]] * n)
    status = column("phrase_status", [STATUS_OK] * n)
    errors = column("phrase_error", [""] * n)
    return [(str(p) if p is not None else "", [] if indices[k] is None else [int(i) for i in indices[k]],
             str(status[k]), str(errors[k] or "")) for k, p in enumerate(phrases)]

"""Nouns rows from TokenCompose's own phrases (``profiles.<p>.text.phrases: authors``).

The authors' ``attn_list`` phrases of each metadata record replace the tagger's: each is aligned to CLIP
tokens at its own position in the caption, and the row keeps the phrases' mask paths.
"""

from __future__ import annotations

from typing import Any, Sequence

from pipeline.datasets.tokencompose_metadata import image_id_of
from pipeline.text.align import locate_phrases
from pipeline.text.nouns_rows import failed_row, image_row_failure, nouns_row


def authors_nouns_row(record: dict[str, Any], tokenizer: Any, max_token_index: int) -> dict[str, Any]:
    """A ``nouns`` row of one metadata record: its phrases, their alignment, their mask paths.

    Every phrase is aligned at its own position in the caption (:func:`pipeline.text.align.locate_phrases`),
    with a mask or without: the masks stage decides what a null mask means (``no_detection`` with
    ``masks.source: authors``, as the original training dropped such words; grounded anew with
    ``grounded_sam``). The row has an extra column ``mask_paths`` (list of str or None, as in the metadata).
    """
    image_id = image_id_of(record["file_name"])
    phrases = [p for p, _ in record["attn_list"]]
    starts = locate_phrases(record["text"], phrases)
    return nouns_row(tokenizer, image_id, record["text"], phrases, starts, max_token_index,
                     mask_paths=[m for _, m in record["attn_list"]])


def authors_nouns_rows(image_rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]], tokenizer: Any,
                       max_token_index: int) -> list[dict[str, Any]]:
    """``nouns`` rows for the images rows (``image_id``, ``caption``, ``status``) from the authors' phrases.

    An image absent from the metadata, or whose caption differs from the metadata's, is a failed row.
    """
    by_id = {image_id_of(r["file_name"]): r for r in records}
    out = []
    for row in image_rows:
        image_id = str(row["image_id"])
        failure = image_row_failure(row, mask_paths=[])
        record = by_id.get(image_id)
        if failure is None and record is None:
            failure = failed_row(image_id, row["caption"], "not_in_metadata",
                                 f"caption {image_id}: image not in the authors' metadata", mask_paths=[])
        elif failure is None and record["text"] != row["caption"]:
            failure = failed_row(image_id, row["caption"], "caption_mismatch",
                                 f"caption {image_id}: {row['caption']!r} differs from the metadata's "
                                 f"{record['text']!r}", mask_paths=[])
        out.append(failure or authors_nouns_row(record, tokenizer, max_token_index))
    return out

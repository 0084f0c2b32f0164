"""Rows and metrics of the ``nouns`` stage (``artifacts/nouns/``, ``metrics/nouns.json``).

A row holds a caption's noun phrases, their CLIP token positions (:func:`pipeline.text.align.align_phrase`)
and a reason code for each phrase (:data:`PHRASE_REASONS`) and for the caption (:data:`CAPTION_REASONS`).
:func:`nouns_row` builds one, :func:`tagger_nouns_rows` builds them from a tagger's phrases;
:func:`summarize` counts them for ``metrics/nouns.json`` and :func:`check_skip_rate` fails the stage when
too many captions were skipped. :class:`TextCfg` and :class:`TextScale` are the stage's params.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any, Iterable, Literal, Sequence

from pipeline.config import Bounds, Fraction, PositiveInt, StageError
from pipeline.fetch import check_sha256_param
from pipeline.store.shards import STATUS_OK
from pipeline.text.align import CaptionTokens, align_phrase
from pipeline.text.tagger import noun_phrases

log = logging.getLogger(__name__)

# Reason codes of one phrase (``phrase_status``) and of one caption (``status``).
PHRASE_REASONS = {
    "invalid_phrase": "the phrase is not a string",
    "empty_phrase": "the phrase is empty or has no CLIP tokens",
    "not_in_caption": "the phrase's CLIP tokens do not occur contiguously in the caption's tokens",
    "partial_at_end": "only the start of the phrase's tokens ends the caption (IndexError in the original)",
    "position_mismatch": "the phrase's tokens occur, but none at the phrase's own position in the caption",
    "past_context": "a token index passes text.max_token_index (the 77-token context)",
    "decode_mismatch": "the matched tokens decode to something other than the phrase (split UTF-8 bytes)",
}
CAPTION_REASONS = {
    "empty_caption": "the caption is empty or not a string",
    "image_failed": "the image row of artifacts/data/images has a failed status",
    "no_phrases": "the caption has no noun phrase",
    "no_aligned_phrases": "none of the caption's phrases aligned to CLIP tokens",
    "not_in_metadata": "the image is not in the authors' metadata (phrases: authors)",
    "caption_mismatch": "the caption differs from the authors' metadata caption (phrases: authors)",
}


@dataclass(frozen=True)
class TextCfg:
    """Top-level ``text`` params (identical in every profile)."""

    max_token_index: Annotated[int, Bounds(low=1, high=75)]  # largest position (75: SOT at 0, EOT at 76)
    max_skip_rate: Fraction  # the nouns stage fails when a larger share of captions is skipped
    tagger_iterations: PositiveInt = 10  # training epochs of the embedded tagger


@dataclass(frozen=True)
class TextScale:
    """``profiles.<p>.text`` params."""

    tagger: Literal["embedded", "pretrained"]
    phrases: Literal["tagger", "authors"]
    metadata: str | None = None  # authors' metadata.jsonl (path or URL), for phrases: authors
    metadata_sha256: str | None = None  # its SHA-256, checked on reading; None: not checked
    tagger_sha256: str | None = None  # pretrained: digest of the tagger files (tagger.tagger_digest); None: not checked
    shard_size: PositiveInt = 1000

    def __post_init__(self) -> None:
        check_sha256_param(self.metadata_sha256, "metadata_sha256")
        check_sha256_param(self.tagger_sha256, "tagger_sha256")


class SkipRateError(StageError, RuntimeError):
    """The share of skipped captions passed ``text.max_skip_rate``."""


# --- rows of artifacts/nouns -----------------------------------------------------------------------

def failed_row(image_id: str, caption: Any, status: str, error: str, **extra: Any) -> dict[str, Any]:
    """A ``nouns`` row for a caption that was skipped as a whole (``status`` from :data:`CAPTION_REASONS`)."""
    log.warning("%s", error)
    row = dict(image_id=image_id, caption=caption if isinstance(caption, str) else None, phrases=[],
               token_indices=[], phrase_status=[], phrase_error=[], status=status, error=error)
    return {**row, **extra}


def nouns_row(
    tokenizer: Any, image_id: str, caption: str, phrases: Sequence[Any], starts: Sequence[int | None],
    max_token_index: int, **extra: Any,
) -> dict[str, Any]:
    """A ``nouns`` row: every phrase aligned (or given a reason), caption status from the phrases."""
    if not phrases:
        return failed_row(image_id, caption, "no_phrases", f"caption {image_id}: no noun phrase in {caption!r}",
                          **extra)
    tokens = CaptionTokens.of(tokenizer, caption)
    aligned = [align_phrase(tokenizer, tokens, phrase, start, max_token_index, image_id)
               for phrase, start in zip(phrases, starts)]
    for a in aligned:
        if not a.ok:
            log.info("%s", a.error)
    ok = any(a.ok for a in aligned)
    return dict(
        image_id=image_id, caption=caption, phrases=[p if isinstance(p, str) else str(p) for p in phrases],
        token_indices=[a.indices for a in aligned], phrase_status=[a.status for a in aligned],
        phrase_error=[a.error for a in aligned], status=STATUS_OK if ok else "no_aligned_phrases",
        error="" if ok else f"caption {image_id}: none of its {len(phrases)} phrases aligned to CLIP tokens",
        **extra,
    )


def image_row_failure(row: dict[str, Any], **extra: Any) -> dict[str, Any] | None:
    """A failed ``nouns`` row when the images row failed or has no caption; ``None`` when it is usable."""
    image_id = str(row.get("image_id"))
    caption = row.get("caption")
    if row.get("status", STATUS_OK) != STATUS_OK:
        detail = f"image row has status {row.get('status')!r} ({row.get('error')})"
        return failed_row(image_id, caption, "image_failed", f"caption {image_id}: {detail}", **extra)
    if not isinstance(caption, str) or not caption.strip():
        return failed_row(image_id, caption, "empty_caption", f"caption {image_id}: empty caption {caption!r}",
                          **extra)
    return None


def tagger_nouns_rows(
    rows: Sequence[dict[str, Any]], tagger: Any, tokenizer: Any, max_token_index: int,
) -> list[dict[str, Any]]:
    """``nouns`` rows of images rows (``image_id``, ``caption``, ``status``) with phrases from ``tagger``."""
    out = []
    for row in rows:
        failure = image_row_failure(row)
        if failure is not None:
            out.append(failure)
            continue
        phrases = noun_phrases(tagger, row["caption"])
        out.append(nouns_row(tokenizer, str(row["image_id"]), row["caption"], [p.text for p in phrases],
                             [p.start for p in phrases], max_token_index))
    return out


def summarize(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Flat counts for ``metrics/nouns.json``: captions, phrases, aligned, skipped by reason."""
    counts: dict[str, Any] = {"captions": 0, "captions_ok": 0, "phrases": 0, "aligned": 0}
    counts.update({f"skipped_{r}": 0 for r in CAPTION_REASONS})
    counts.update({f"phrase_{r}": 0 for r in PHRASE_REASONS})
    for row in rows:
        counts["captions"] += 1
        if row["status"] == STATUS_OK:
            counts["captions_ok"] += 1
        else:
            counts[f"skipped_{row['status']}"] = counts.get(f"skipped_{row['status']}", 0) + 1
        for status in row["phrase_status"]:
            counts["phrases"] += 1
            key = "aligned" if status == STATUS_OK else f"phrase_{status}"
            counts[key] = counts.get(key, 0) + 1
    skipped = counts["captions"] - counts["captions_ok"]
    counts["skipped"] = skipped
    counts["skip_rate"] = skipped / counts["captions"] if counts["captions"] else 0.0
    return counts


def check_skip_rate(metrics: dict[str, Any], max_skip_rate: float) -> None:
    """Raise :class:`SkipRateError` when no caption was read or the skip rate passes ``max_skip_rate``."""
    if metrics["captions"] == 0:
        raise SkipRateError("nouns: no captions in artifacts/data/images; run the train_data stage first")
    if metrics["skip_rate"] > max_skip_rate:
        reasons = {k: v for k, v in metrics.items() if k.startswith("skipped_") and v}
        raise SkipRateError(
            f"nouns: {metrics['skipped']} of {metrics['captions']} captions skipped "
            f"({metrics['skip_rate']:.1%} > text.max_skip_rate={max_skip_rate:.1%}); reasons {reasons}. "
            f"See phrase_error/error in artifacts/nouns/ for each caption"
        )

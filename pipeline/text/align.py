"""Positions of a caption's phrases among its CLIP tokens (SPEC §1.3).

:func:`align_phrase` gives the positions of a phrase's CLIP tokens in the 77-token sequence (SOT = 0), with
the semantics of the original ``get_word_idx`` (lower-cased phrase, token ids without SOT/EOT, contiguous
match, +1 for SOT, decode-and-compare check), two fixes: the occurrence that is used is the one at the
phrase's character position (:func:`locate_phrases`), not the first match of its tokens, and every failure
is a recorded reason code (:data:`pipeline.text.nouns_rows.PHRASE_REASONS`) with a message, never an
exception.

The nouns stage, training and the attention-map evaluations all align phrases with this module; nothing
here depends on how the phrases were found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from pipeline.sequences import subsequence_starts
from pipeline.store.shards import STATUS_OK


# --- phrase positions in the caption ---------------------------------------------------------------

def locate_phrases(caption: str, phrases: Sequence[str]) -> list[int | None]:
    """Character start of each given phrase (e.g. the authors' ``attn_list`` words) in ``caption``.

    Whole-word, case-insensitive occurrences are found; an occurrence that lies inside an occurrence of a
    longer phrase of the same list ("bear" inside "teddy bear") is passed over when another occurrence
    exists, so each phrase maps to the object it names. ``None`` when the phrase does not occur.
    """
    spans = {p: _occurrences(caption, p) for p in phrases if isinstance(p, str) and p.strip()}
    starts: list[int | None] = []
    for phrase in phrases:
        found = spans.get(phrase) if isinstance(phrase, str) else None
        if not found:
            starts.append(None)
            continue
        covered = [
            (s, e) for other, occ in spans.items()
            if len(other) > len(phrase) and other.lower() != phrase.lower() for s, e in occ
        ]
        free = [s for s, e in found if not any(cs <= s and e <= ce for cs, ce in covered)]
        starts.append((free or [s for s, _ in found])[0])
    return starts


def _occurrences(caption: str, phrase: str) -> list[tuple[int, int]]:
    pattern = re.compile(r"(?<![^\W_])" + re.escape(phrase.strip()) + r"(?![^\W_])", re.IGNORECASE)
    return [(m.start(), m.end()) for m in pattern.finditer(caption)]


# --- alignment to CLIP tokens ----------------------------------------------------------------------

@dataclass(frozen=True)
class Alignment:
    """Token positions of one phrase (SOT = 0; empty unless ``status == "ok"``) and why not."""

    indices: list[int]
    status: str
    error: str

    @property
    def ok(self) -> bool:
        """True when the phrase aligned."""
        return self.status == STATUS_OK


@dataclass(frozen=True)
class CaptionTokens:
    """A caption's CLIP token ids without SOT/EOT and each token's character span in the caption."""

    caption: str
    ids: list[int]
    offsets: list[tuple[int, int]]

    @classmethod
    def of(cls, tokenizer: Any, caption: str) -> "CaptionTokens":
        """Tokenize ``caption`` once (a fast tokenizer: ``return_offsets_mapping`` is needed)."""
        enc = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
        return cls(caption, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])


def _fail(status: str, caption_id: str, phrase: Any, detail: str) -> Alignment:
    return Alignment([], status, f"caption {caption_id}: word {phrase!r} {detail}; phrase skipped")


def _partial_at_end(ids: Sequence[int], target: Sequence[int]) -> bool:
    start = max(0, len(ids) - len(target) + 1)
    return any(list(ids[i:]) == list(target[: len(ids) - i]) for i in range(start, len(ids)))


def _pick(tokens: CaptionTokens, candidates: list[int], start: int | None) -> int | None:
    """The candidate whose first token starts at (or spans) character ``start``; first when ``start`` is None."""
    if start is None:
        return candidates[0]
    for i in candidates:
        s, e = tokens.offsets[i]
        if s == start or s <= start < e:
            return i
    return None


def decoded_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """Tokens decoded one by one, ``#`` stripped, concatenated without separators (SPEC §1.3 step 6)."""
    return "".join(tokenizer.decode([i]).strip().strip("#") for i in ids)


def align_phrase(
    tokenizer: Any, tokens: CaptionTokens, phrase: Any, start: int | None = None,
    max_token_index: int = 75, caption_id: str = "?",
) -> Alignment:
    """Positions of ``phrase``'s CLIP tokens in the 77-token sequence of ``tokens.caption``.

    Args:
        tokenizer: the CLIP tokenizer of the model in use (fast tokenizer).
        tokens: :meth:`CaptionTokens.of` of the caption.
        phrase: the words to find (e.g. ``"teddy bear"``); lower-cased before tokenizing.
        start: character position of the phrase's occurrence in the caption; ``None`` uses the first
            match of its tokens (the original's behaviour).
        max_token_index: largest allowed position (75: the text encoder's 77 positions hold SOT at
            0 and, after truncation, EOT at 76, so a word at 76 would be supervised on EOT).
        caption_id: named in the error message.

    Returns:
        :class:`Alignment` with ``indices = [i+1, ..., i+len(W)]`` (list of ints) or a reason code.
    """
    if not isinstance(phrase, str):
        return _fail("invalid_phrase", caption_id, phrase, f"is a {type(phrase).__name__}, not a string")
    target = tokenizer(phrase.lower(), add_special_tokens=False)["input_ids"] if phrase.strip() else []
    if not target:
        return _fail("empty_phrase", caption_id, phrase, "is empty")
    candidates = subsequence_starts(tokens.ids, target)
    if not candidates:
        if _partial_at_end(tokens.ids, target):
            return _fail("partial_at_end", caption_id, phrase, "only partly ends the caption's CLIP tokens")
        return _fail("not_in_caption", caption_id, phrase, "not found in its CLIP tokens")
    first = _pick(tokens, candidates, start)
    if first is None:
        return _fail("position_mismatch", caption_id, phrase, f"has no token match at character {start}")
    indices = [first + 1 + j for j in range(len(target))]
    if indices[-1] > max_token_index:
        return _fail("past_context", caption_id, phrase,
                     f"sits at token {indices[-1]}, past text.max_token_index={max_token_index}")
    decoded = decoded_text(tokenizer, tokens.ids[first : first + len(target)])
    if decoded != phrase.lower().replace(" ", ""):
        return _fail("decode_mismatch", caption_id, phrase, f"decodes as {decoded!r}")
    return Alignment(indices, STATUS_OK, "")

"""Attend-and-Excite token indices (SPEC §6.3): which CLIP tokens of a prompt name its objects."""

from __future__ import annotations

from typing import Any, Sequence

from pipeline.sampling.settings import TokenRule
from pipeline.sequences import subsequence_starts

MAX_TOKEN_INDEX = 75  # 77-token CLIP context: SOT at 0, EOT at 76 at the latest (truncation keeps it)


class TokenIndexError(ValueError):
    """A prompt's object could not be aligned to its CLIP tokens; the message names prompt and object."""


def head_word(name: str) -> tuple[int, str]:
    """(word position, word) of a name's head word: the last word, or X for "X of Y" names."""
    words = name.split(" of ")[0].split()
    if not words:
        raise TokenIndexError(f"object name {name!r} has no words")
    return len(words) - 1, words[-1]


def ae_token_indices(tokenizer: Any, text: str, objects: Sequence[str], rule: TokenRule = "head_word") -> list[int]:
    """Token indices (SOT = 0) that Attend-and-Excite should excite for a MultiGen prompt.

    For each object in order, the token sequence of ``"a " + name`` or ``"an " + name`` (MultiGen writes
    "a" before every name; SR2D writes "an apple") is searched at or after the previous match, the earlier
    occurrence winning; the article is skipped. ``head_word``: every BPE piece of the head word;
    ``last_piece``: only the head word's last piece (one index per object). Each object span must decode to
    its name and every index must lie before EOT and at most at ``MAX_TOKEN_INDEX`` (75). Raises
    :class:`TokenIndexError` naming prompt and object.
    """
    if rule not in ("head_word", "last_piece"):
        raise ValueError(f"token rule {rule!r}: use 'head_word' (SPEC §6.3 default) or 'last_piece' (alternative A)")
    ids = tokenizer(text).input_ids
    pos, out = 1, []
    for name in objects:
        found = []
        for article in ("a", "an"):
            span = tokenizer(f"{article} {name}", add_special_tokens=False).input_ids
            starts = subsequence_starts(ids, span, pos)
            if starts:
                at = starts[0]
                found.append((at, at + len(tokenizer(article, add_special_tokens=False).input_ids), at + len(span)))
        if not found:
            raise TokenIndexError(f"prompt {text!r}: object {name!r} ('a {name}' or 'an {name}') not found in its "
                                  f"CLIP tokens after position {pos}")
        _, first, end = min(found)
        if tokenizer.decode(ids[first:end]).strip() != name:
            raise TokenIndexError(f"prompt {text!r}: tokens {first}..{end - 1} decode to "
                                  f"{tokenizer.decode(ids[first:end])!r}, not {name!r}")
        pieces = [len(tokenizer(w, add_special_tokens=False).input_ids) for w in name.split()]
        if sum(pieces) != end - first:
            raise TokenIndexError(f"prompt {text!r}: {name!r} splits into {end - first} tokens in context but "
                                  f"{sum(pieces)} word by word")
        word, _ = head_word(name)
        head_start = first + sum(pieces[:word])
        head = list(range(head_start, head_start + pieces[word]))
        out += head if rule == "head_word" else head[-1:]
        pos = end
    if any(i >= min(len(ids) - 1, MAX_TOKEN_INDEX + 1) for i in out):
        raise TokenIndexError(f"prompt {text!r}: indices {out} reach EOT or pass {MAX_TOKEN_INDEX}")
    return out

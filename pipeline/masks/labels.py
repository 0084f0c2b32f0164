"""Grounding DINO's text side: the prompt built from a caption's phrases, and which phrase a box label names.

:func:`match_label` applies the rules of SPEC §2.6 with two quirks fixed (see docs/grounding.md): words are
matched, not character substrings ("man" never matches "woman"), and an empty label is skipped with a reason
instead of going to the first phrase.
"""

from __future__ import annotations

import re
from typing import Sequence

from pipeline.sequences import subsequence_starts


def build_prompt(phrases: Sequence[str]) -> str:
    """Grounding DINO text prompt (SPEC §2.4): ``" . ".join(phrases)``, lower-cased, stripped, ending in ".".

    >>> build_prompt(["piece", "Plate", "chocolate spread"])
    'piece . plate . chocolate spread.'
    """
    prompt = " . ".join(phrases).lower().strip()
    return prompt if prompt.endswith(".") else prompt + "."


_SPECIAL = re.compile(r"\[(?:cls|sep|pad|unk|mask)\]")
_TOKEN = re.compile(r"\.|[^\s.]+")


def label_tokens(text: str) -> list[str]:
    """Words of a decoded label or phrase: lower-cased, BERT special tokens dropped, ``" - "`` joined to
    ``"-"`` (GroundingDINO decodes "coca-cola" as "coca - cola"), ``"."`` kept as a separator token."""
    text = _SPECIAL.sub(" ", text.lower())
    text = re.sub(r"\s*-\s*", "-", text)
    text = re.sub(r"\s*'\s*", "'", text)
    return _TOKEN.findall(text)


def _hyphen_parts(tokens: Sequence[str]) -> list[str]:
    """Tokens with hyphenated words split into their parts: ``["t-shirt", "."]`` -> ``["t", "shirt", "."]``."""
    return [part for token in tokens for part in token.split("-") if part] or list(tokens)


def _strip_dots(tokens: list[str]) -> list[str]:
    """``tokens`` without leading and trailing ``"."`` separators."""
    while tokens and tokens[0] == ".":
        tokens = tokens[1:]
    while tokens and tokens[-1] == ".":
        tokens = tokens[:-1]
    return tokens


def match_label(label: str, phrases: Sequence[str]) -> tuple[int | None, str]:
    """Index of the phrase a decoded box label belongs to, and the rule that fired (or the skip reason).

    Rules (first that fires; ties go to the earliest phrase, i.e. caption order):

    * ``"empty_label"`` (skip): the label has no word (``""``, ``"[SEP]"``, ``". ."``);
    * ``"exact"``: same words as the phrase (case, hyphen spacing and end dots ignored);
    * ``"contains"``: the phrase's words occur contiguously in the label (not across a ``"."``), or the
      label's words occur contiguously in the phrase; hyphenated words count as their parts here (a
      ``"shirt"`` label belongs to "t-shirt", ``"cola bottle"`` to "Coca-Cola bottle");
    * ``"prefix"``: every label word is a word of the phrase or the start of one (a word-piece label such
      as "banana" of "bananas");
    * ``"unmatched_label"`` (skip) otherwise.
    """
    tokens = _strip_dots(label_tokens(label))
    words = [t for t in tokens if t != "."]
    if not words:
        return None, "empty_label"
    targets = [[t for t in label_tokens(p) if t != "."] for p in phrases]
    for i, target in enumerate(targets):
        if target and target == tokens:
            return i, "exact"
    label_parts = _hyphen_parts(tokens)
    for i, target in enumerate(targets):
        parts = _hyphen_parts(target)
        inside_label = subsequence_starts(label_parts, parts)
        if inside_label or ("." not in tokens and subsequence_starts(parts, label_parts)):
            return i, "contains"
    for i, target in enumerate(targets):
        if target and all(any(t == w or t.startswith(w) for t in target) for w in words):
            return i, "prefix"
    return None, "unmatched_label"

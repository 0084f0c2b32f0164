"""Every word the demo captions and editing prompts use, by Penn Treebank tag (for the tagger corpus).

No stage runs this module: it documents the demo vocabulary (docs/data.md) and lets the tests check that
the demo captions keep to it.
"""

from __future__ import annotations

from pipeline.datasets.demo_drawing import NOUNS, PALETTE
from pipeline.datasets.demo_images import PLURALS, SIZE_WORDS

VOCABULARY: dict[str, tuple[str, ...]] = {
    "NN": NOUNS + ("table",),
    "NNS": tuple(PLURALS[n] for n in NOUNS),
    "JJ": tuple(PALETTE) + tuple(SIZE_WORDS) + ("next",),
    "DT": ("a",),
    "CD": ("two",),
    "CC": ("and",),
    "IN": ("above", "below", "near", "with", "on"),
    "TO": ("to",),
    "EX": ("there",),
    "VBZ": ("is",),
    "VBP": ("are",),
}

"""The one sub-sequence finder, against a brute-force search over string renderings."""

from __future__ import annotations

import random

from pipeline.sequences import subsequence_starts


def test_finds_every_occurrence_including_overlapping_ones_from_start():
    assert subsequence_starts([1, 2, 1, 2, 1], [1, 2, 1]) == [0, 2]
    assert subsequence_starts([1, 2, 1, 2, 1], [1, 2, 1], start=1) == [2]
    assert subsequence_starts(["t", "shirt", "."], ["shirt"]) == [1]
    assert subsequence_starts([3, 4], [3, 4, 5]) == []
    assert subsequence_starts([3, 4], []) == []


def test_agrees_with_brute_force_on_random_sequences():
    rng = random.Random(0)
    for _ in range(300):
        seq = [rng.randrange(3) for _ in range(rng.randrange(12))]
        sub = [rng.randrange(3) for _ in range(rng.randrange(1, 4))]
        start = rng.randrange(len(seq) + 1)
        expected = [i for i in range(len(seq)) if i >= start and tuple(seq[i : i + len(sub)]) == tuple(sub)]
        assert subsequence_starts(seq, sub, start) == expected

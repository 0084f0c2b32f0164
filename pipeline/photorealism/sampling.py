"""Images of an evaluated model for the FID captions: one image per caption, with the MultiGen sampler.

Every caption ``i`` of reference set ``<name>`` is the item (prompt set ``fid_<name>``, prompt id ``i``,
image index 0), so its initial noise is seeded from (seed, "multigen", "fid_<name>", i, 0) as MultiGen's
(:mod:`pipeline.sampling.items`): every model starts image ``i`` from the same noise, in any batch and after
a resume. Shards go to ``artifacts/fid_samples/<model>/<name>/`` with the MultiGen sample columns.

Attend-and-Excite needs token indices, which MultiGen derives from its object list. A free caption has
none, so :func:`caption_token_indices` takes the caption's noun phrases from the project's noun tagger
(SPEC §2.3, as for training captions), aligns them to CLIP tokens and keeps every BPE piece of each phrase's
head (last) word, SPEC §6.3's head-word rule. A caption without an aligned noun is a failed image with that
reason, never an unexcited image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from pipeline.sampling.items import SampleItem
from pipeline.sampling.sampler import STATUS_FAILED, Sampler
from pipeline.store.identity import code_digest
from pipeline.store.shards import write_shards
from pipeline.text.align import CaptionTokens, align_phrase
from pipeline.text.tagger import noun_phrases


def promptset_of(reference: str) -> str:
    """The prompt-set name (seed key) of a reference set's captions: ``fid_<reference>``."""
    return f"fid_{reference}"


@dataclass(frozen=True)
class CaptionItem(SampleItem):
    """A :class:`SampleItem` of a free caption; ``token_indices`` are its A&E indices, or the reason
    there are none (a ``str``); plain SD ignores them."""

    token_indices: tuple[int, ...] | str = ()


def head_word_indices(tokenizer: Any, phrase: str, indices: Sequence[int]) -> list[int]:
    """The token indices of a phrase's head (last) word: the last ``len(pieces of that word)`` of its span."""
    pieces = len(tokenizer(phrase.split()[-1], add_special_tokens=False).input_ids)
    return list(indices[-pieces:])


def caption_token_indices(tagger: Any, tokenizer: Any, text: str, max_token_index: int) -> tuple[int, ...] | str:
    """A&E token indices of a free caption (head word of every aligned noun phrase), or why there are none."""
    tokens = CaptionTokens.of(tokenizer, text)
    out: list[int] = []
    for phrase in noun_phrases(tagger, text):
        aligned = align_phrase(tokenizer, tokens, phrase.text, phrase.start, max_token_index, "fid caption")
        if aligned.ok:
            out += head_word_indices(tokenizer, phrase.text, aligned.indices)
    if not out:
        return f"caption {text!r}: no noun phrase aligned to CLIP tokens (Attend-and-Excite needs one)"
    return tuple(sorted(set(out)))


def caption_items(reference: str, captions: Sequence[dict[str, Any]],
                  token_indices: Sequence[tuple[int, ...] | str] | None = None) -> list[CaptionItem]:
    """One item per caption (prompt id = its position in the captions file), with A&E indices when given."""
    tokens = token_indices if token_indices is not None else [()] * len(captions)
    return [CaptionItem(promptset_of(reference), i, 0, str(c["text"]), (), tok)
            for i, (c, tok) in enumerate(zip(captions, tokens))]


class CaptionSampler(Sampler):
    """The MultiGen :class:`Sampler` with the A&E indices of each :class:`CaptionItem` taken from the item."""

    def token_indices(self, item: SampleItem) -> list[int] | str:
        """The item's own A&E indices, or its reason string when there are none."""
        tokens = getattr(item, "token_indices", "")
        return tokens if isinstance(tokens, str) else list(tokens)


def caption_sampler(sampler: Sampler) -> CaptionSampler:
    """A :class:`CaptionSampler` over an opened sampler's pipeline (compiled already: not compiled again)."""
    return CaptionSampler(sampler.pipe, sampler.kind, sampler.cfg, replace(sampler.scale, compile=False), sampler.seed)


def sample_captions(sampler: CaptionSampler, reference: str, items: Sequence[CaptionItem], out_dir: Path,
                    weights: dict[str, str], rank: int = 0, world_size: int = 1) -> list[Path]:
    """Sample every caption of a reference set into resumable shards under ``out_dir`` (this rank's share)."""
    fingerprint = {"sampler": sampler.fingerprint(weights), "promptset": promptset_of(reference)}
    return write_shards(out_dir, list(items), sampler.rows, sampler.scale.shard_size, fingerprint, rank,
                        world_size, code=code_digest(__name__), desc=f"fid_sample {reference}",
                        redo_statuses=(STATUS_FAILED,))

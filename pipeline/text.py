"""Noun phrases of captions and their positions among the CLIP tokens (SPEC §1.3, §2.3).

Three steps turn a caption into the supervision targets of the token and pixel losses:

1. **Words and tags.** :func:`word_spans` splits a caption into Penn-Treebank-style words with their
   character spans ("man's" -> "man", "'s"; "Coca-Cola" stays one word); an NLTK averaged-perceptron
   tagger gives each word a Penn Treebank tag. The tagger is either trained here from the hand-tagged
   corpus in ``data/tagger/`` (``embedded``) or NLTK's released ``averaged_perceptron_tagger_eng``
   (``pretrained``). Both live in the project's NLTK data folder (``nltk_data/``), the only place
   nltk 3.10 loads tagger files from.
2. **Noun phrases** (:func:`noun_phrases`): maximal runs of consecutive ``NN*`` words, joined with one space,
   in caption order, de-duplicated case-insensitively keeping the first occurrence and its casing
   (the original code used a ``set``, so its order changed with the hash seed).
3. **Alignment** (:func:`align_phrase`): the positions of the phrase's CLIP tokens in the 77-token
   sequence (SOT = 0), with the semantics of the original ``get_word_idx`` (lower-cased phrase, token ids
   without SOT/EOT, contiguous match, +1 for SOT, decode-and-compare check), two fixes: the occurrence that
   is used is the one at the phrase's character position (not the first match of its tokens), and every
   failure is a recorded reason code (:data:`PHRASE_REASONS`) with a message, never an exception.

Rows of the ``nouns`` stage (``artifacts/nouns/``) are built by :func:`nouns_row`; :func:`summarize`
counts them for ``metrics/nouns.json`` and :func:`check_skip_rate` fails the stage when too many
captions were skipped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Sequence

from pipeline.config import Bounds, ConfigError, Fraction, InputDataError, MissingInputError, PositiveInt, StageError
from pipeline.seeding import derive_seed
from pipeline.sequences import subsequence_starts
from pipeline.store.shards import STATUS_OK

log = logging.getLogger(__name__)

DEFAULT_NLTK_DATA = Path("nltk_data")
DEFAULT_CORPUS_DIR = Path("data/tagger")
PRETRAINED_TAGGER = "averaged_perceptron_tagger_eng"
PRETRAINED_URL = (
    "https://raw.githubusercontent.com/nltk/nltk_data/gh-pages/packages/taggers/"
    "averaged_perceptron_tagger_eng.zip"
)
TAGGER_LANG = "eng"

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
    shard_size: PositiveInt = 1000


class TaggerUnavailable(StageError, RuntimeError):
    """The pretrained NLTK tagger is neither in the project's NLTK data folder nor downloadable."""


class SkipRateError(StageError, RuntimeError):
    """The share of skipped captions passed ``text.max_skip_rate``."""


# --- words -----------------------------------------------------------------------------------------

_WORD_RE = re.compile(
    r"""[^\W_]+(?=n['’]t\b)             # "do" of "don't"
      | n['’]t\b                        # "n't"
      | ['’](?:s|re|ve|ll|d|m)\b        # clitics: 's 're 've 'll 'd 'm
      | [^\W_]+(?:-[^\W_]+)*            # words, hyphenated words kept whole ("Coca-Cola", "t-shirt")
      | \S                              # any other character (punctuation) on its own
    """,
    re.VERBOSE | re.IGNORECASE,
)


@dataclass(frozen=True)
class Word:
    """One word of a caption: its text and character span ``caption[start:end]``."""

    text: str
    start: int
    end: int


def word_spans(text: str) -> list[Word]:
    """Penn-Treebank-style words of ``text`` with their character spans."""
    return [Word(m.group(), m.start(), m.end()) for m in _WORD_RE.finditer(text)]


# --- tagger corpus and training --------------------------------------------------------------------

def parse_tagged_line(line: str, where: str) -> list[tuple[str, str]]:
    """``"A/DT cat/NN ./."`` -> ``[("A", "DT"), ("cat", "NN"), (".", ".")]``.

    The words must be exactly what :func:`word_spans` makes of the untagged caption, so training and
    tagging see the same tokenization; a mismatch raises ``ValueError`` naming ``where``.
    """
    pairs = []
    for item in line.split():
        word, sep, tag = item.rpartition("/")
        if not sep or not word or not tag or tag != tag.upper():
            raise InputDataError(f"{where}: {item!r} is not word/TAG (Penn Treebank tag in capitals)")
        pairs.append((word, tag))
    words = [w for w, _ in pairs]
    retokenized = [w.text for w in word_spans(" ".join(words))]
    if retokenized != words:
        raise InputDataError(f"{where}: words {words} re-tokenize as {retokenized}; split them the same way")
    return pairs


def read_tagged_corpus(corpus_dir: Path = DEFAULT_CORPUS_DIR) -> list[list[tuple[str, str]]]:
    """Every ``*.txt`` file of ``corpus_dir`` (sorted), one tagged caption per non-blank, non-# line."""
    files = sorted(Path(corpus_dir).glob("*.txt"))
    if not files:
        raise MissingInputError(f"{corpus_dir}: no *.txt tagged corpus; it ships with the project (data/tagger/)")
    sentences = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                sentences.append(parse_tagged_line(line, f"{path}:{number}"))
    return sentences


def corpus_fingerprint(sentences: Sequence[Sequence[tuple[str, str]]], seed: int, iterations: int) -> str:
    """A short hash of the corpus and the training settings (names the trained tagger's folder)."""
    import nltk

    blob = "\n".join(" ".join(f"{w}/{t}" for w, t in s) for s in sentences)
    blob += f"\nseed={seed} iterations={iterations} nltk={nltk.__version__}"
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def train_tagger(sentences: Sequence[Sequence[tuple[str, str]]], seed: int, iterations: int):
    """Train ``nltk``'s averaged perceptron on ``sentences``, deterministically.

    NLTK shuffles the sentences with the global ``random`` module between epochs; that module is seeded
    from ``(seed, "tagger")`` for the duration of training and restored afterwards.
    """
    from nltk.tag.perceptron import PerceptronTagger

    tagger = PerceptronTagger(load=False)
    state = random.getstate()
    nltk_log = logging.getLogger("nltk.tag.perceptron")
    level = nltk_log.level
    try:
        random.seed(derive_seed(seed, "tagger"))
        nltk_log.setLevel(logging.WARNING)  # one INFO line per epoch otherwise
        tagger.train([list(s) for s in sentences], nr_iter=iterations)
    finally:
        random.setstate(state)
        nltk_log.setLevel(level)
    return tagger


def use_nltk_data(root: Path = DEFAULT_NLTK_DATA) -> Path:
    """Create ``root`` and put it first on ``nltk.data.path`` (nltk only loads from its data dirs)."""
    import nltk

    root = Path(root).resolve()
    (root / "taggers").mkdir(parents=True, exist_ok=True)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


def _load_from(root: Path, name: str):
    from nltk.tag.perceptron import PerceptronTagger

    return PerceptronTagger(lang=TAGGER_LANG, loc=str(root / "taggers" / name))


def embedded_tagger(
    corpus_dir: Path = DEFAULT_CORPUS_DIR, nltk_root: Path = DEFAULT_NLTK_DATA, seed: int = 0,
    iterations: int = 10,
):
    """The tagger trained from ``corpus_dir``, saved under ``<nltk_root>/taggers/embedded_<hash>/``.

    The folder name hashes the corpus and settings, so a changed corpus trains a new tagger and an
    unchanged one is loaded from disk; either way the returned tagger is the one loaded from the files.
    """
    root = use_nltk_data(nltk_root)
    sentences = read_tagged_corpus(corpus_dir)
    name = f"embedded_{corpus_fingerprint(sentences, seed, iterations)}"
    folder = root / "taggers" / name
    if not all((folder / f).is_file() for f in _param_files()):
        staging = root / "taggers" / f"tmp_{name}_{os.getpid()}"  # complete files or none under `folder`
        train_tagger(sentences, seed, iterations).save_to_json(lang=TAGGER_LANG, loc=str(staging))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        log.info("trained the embedded tagger on %d captions into %s", len(sentences), folder)
    return _load_from(root, name)


def _param_files() -> tuple[str, ...]:
    return tuple(f"{PRETRAINED_TAGGER}.{part}.json" for part in ("weights", "tagdict", "classes"))


def pretrained_tagger(nltk_root: Path = DEFAULT_NLTK_DATA, download: bool = True):
    """NLTK's ``averaged_perceptron_tagger_eng`` from ``<nltk_root>/taggers/``, fetched there if missing.

    Raises :class:`TaggerUnavailable` naming the files and folder to provide when it cannot be fetched.
    """
    root = use_nltk_data(nltk_root)
    folder = root / "taggers" / PRETRAINED_TAGGER
    if not all((folder / f).is_file() for f in _param_files()) and download:
        import nltk

        try:
            nltk.download(PRETRAINED_TAGGER, download_dir=str(root), quiet=True, raise_on_error=True)
        except Exception as err:  # nltk raises ValueError/URLError/OSError depending on the failure
            log.warning("nltk.download(%r) failed: %s", PRETRAINED_TAGGER, err)
    missing = [f for f in _param_files() if not (folder / f).is_file()]
    if missing:
        raise TaggerUnavailable(
            f"NLTK's {PRETRAINED_TAGGER} is not in {folder} and could not be downloaded (no network?). "
            f"Provide it by hand: fetch {PRETRAINED_URL} where there is network and unzip it into "
            f"{root / 'taggers'}/, so that {folder}/ holds {', '.join(_param_files())} "
            f"(missing: {', '.join(missing)}); or set profiles.<profile>.text.tagger: embedded."
        )
    return _load_from(root, PRETRAINED_TAGGER)


def load_tagger(kind: str, nltk_root: Path = DEFAULT_NLTK_DATA, corpus_dir: Path = DEFAULT_CORPUS_DIR,
                seed: int = 0, iterations: int = 10):
    """``kind`` = ``embedded`` (trained from ``corpus_dir``) or ``pretrained`` (NLTK's English tagger)."""
    if kind == "embedded":
        return embedded_tagger(corpus_dir, nltk_root, seed, iterations)
    if kind == "pretrained":
        return pretrained_tagger(nltk_root)
    raise ConfigError(f"text.tagger: {kind!r} is not 'embedded' or 'pretrained'")


# --- noun phrases ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phrase:
    """A noun phrase and the character span ``caption[start:end]`` of its first occurrence."""

    text: str
    start: int
    end: int


def noun_runs(words: Sequence[Word], tags: Sequence[str]) -> list[Phrase]:
    """Maximal runs of consecutive words whose tag contains ``NN`` (SPEC §2.3), in order, not de-duplicated.

    A word without a letter or digit ("?", "'") is never a noun, whatever the tagger says.
    """
    runs: list[list[Word]] = []
    previous_noun = False
    for word, tag in zip(words, tags):
        is_noun = "NN" in tag and any(ch.isalnum() for ch in word.text)
        if is_noun and previous_noun:
            runs[-1].append(word)
        elif is_noun:
            runs.append([word])
        previous_noun = is_noun
    return [Phrase(" ".join(w.text for w in run), run[0].start, run[-1].end) for run in runs]


def dedupe_phrases(phrases: Iterable[Phrase]) -> list[Phrase]:
    """Keep the first occurrence of each phrase, compared case-insensitively (casing of the first kept)."""
    seen: set[str] = set()
    kept = []
    for phrase in phrases:
        key = phrase.text.lower()
        if key not in seen:
            seen.add(key)
            kept.append(phrase)
    return kept


def noun_phrases(tagger: Any, caption: str) -> list[Phrase]:
    """Noun phrases of ``caption`` in caption order (runs of NN* words, de-duplicated)."""
    words = word_spans(caption)
    if not words:
        return []
    tags = [tag for _, tag in tagger.tag([w.text for w in words])]
    return dedupe_phrases(noun_runs(words, tags))


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

"""Noun phrases of captions from a part-of-speech tagger (SPEC §2.3).

1. **Words and tags.** :func:`word_spans` splits a caption into Penn-Treebank-style words with their
   character spans ("man's" -> "man", "'s"; "Coca-Cola" stays one word); an NLTK averaged-perceptron
   tagger gives each word a Penn Treebank tag. The tagger is either trained here from the hand-tagged
   corpus in ``data/tagger/`` (``embedded``) or NLTK's released ``averaged_perceptron_tagger_eng``
   (``pretrained``). Both live in the project's NLTK data folder (``nltk_data/``), the only place
   nltk 3.10 loads tagger files from. ``nltk.download`` checks the archive it fetches, but nothing checks
   the unpacked files it loads later, so the pretrained tagger's files are checked here against a digest
   pinned in params (:func:`tagger_digest`, :func:`verify_tagger_files`; docs/text.md).
2. **Noun phrases** (:func:`noun_phrases`): maximal runs of consecutive ``NN*`` words, joined with one space,
   in caption order, de-duplicated case-insensitively keeping the first occurrence and its casing
   (the original code used a ``set``, so its order changed with the hash seed).

Only the ``nouns`` stage (``phrases: tagger``) runs this module; the phrases' CLIP token positions come
from :mod:`pipeline.text.align`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.config import ConfigError, InputDataError, MissingInputError, StageError
from pipeline.fetch import sha256_bytes
from pipeline.seeding import derive_seed

log = logging.getLogger(__name__)

DEFAULT_NLTK_DATA = Path("nltk_data")
DEFAULT_CORPUS_DIR = Path("data/tagger")
PRETRAINED_TAGGER = "averaged_perceptron_tagger_eng"
PRETRAINED_URL = (
    "https://raw.githubusercontent.com/nltk/nltk_data/gh-pages/packages/taggers/"
    "averaged_perceptron_tagger_eng.zip"
)
TAGGER_LANG = "eng"
TAGGER_PIN = "profiles.<p>.text.tagger_sha256"  # the params key that pins the pretrained tagger's digest


class TaggerUnavailable(StageError, RuntimeError):
    """The pretrained NLTK tagger is neither in the project's NLTK data folder nor downloadable."""


class TaggerMismatchError(StageError, ValueError):
    """The tagger files on disk are not the ones whose digest params pin."""


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
    return sha256_bytes(blob.encode("utf-8"))[:12]


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


def tagger_file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of each file the tagger in ``folder`` loads (weights, tagdict, classes JSON), by name."""
    return {name: sha256_bytes((Path(folder) / name).read_bytes()) for name in sorted(_param_files())}


def tagger_digest(folder: Path) -> str:
    """One SHA-256 for the tagger in ``folder``: that of the ``sha256sum`` lines of its files, sorted by name.

    The same value by hand: ``sha256sum averaged_perceptron_tagger_eng.{classes,tagdict,weights}.json |
    sha256sum`` in the folder.
    """
    lines = "".join(f"{digest}  {name}\n" for name, digest in tagger_file_digests(folder).items())
    return sha256_bytes(lines.encode("utf-8"))


def verify_tagger_files(folder: Path, sha256: str | None) -> str:
    """The :func:`tagger_digest` of ``folder``, checked against ``sha256`` (``None``: not checked, a warning).

    Raises :class:`TaggerMismatchError` naming the folder, both digests, each file's SHA-256 and the fix.
    """
    digest = tagger_digest(folder)
    if sha256 is None:
        log.warning("%s: tagger files not verified (%s is null); their digest is %s", folder, TAGGER_PIN, digest)
    elif digest != sha256.lower():
        files = ", ".join(f"{name} {d}" for name, d in tagger_file_digests(folder).items())
        raise TaggerMismatchError(
            f"{folder}: the tagger files have digest {digest}, but {TAGGER_PIN} is {sha256.lower()} (files: "
            f"{files}). They are not the files the pin was taken from: delete {folder} to download them again, "
            f"or, if these are the files you want, set {TAGGER_PIN}: {digest}")
    return digest


def pretrained_dir(nltk_root: Path = DEFAULT_NLTK_DATA) -> Path:
    """The folder NLTK's ``averaged_perceptron_tagger_eng`` is unpacked into under ``nltk_root``."""
    return Path(nltk_root).resolve() / "taggers" / PRETRAINED_TAGGER


def pretrained_tagger(nltk_root: Path = DEFAULT_NLTK_DATA, download: bool = True, sha256: str | None = None):
    """NLTK's ``averaged_perceptron_tagger_eng`` from ``<nltk_root>/taggers/``, fetched there if missing.

    Its files are checked against ``sha256`` (:func:`verify_tagger_files`; ``None``: not checked).
    Raises :class:`TaggerUnavailable` naming the files and folder to provide when it cannot be fetched,
    :class:`TaggerMismatchError` when the files are not the pinned ones.
    """
    root = use_nltk_data(nltk_root)
    folder = pretrained_dir(root)
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
    verify_tagger_files(folder, sha256)
    return _load_from(root, PRETRAINED_TAGGER)


def load_tagger(kind: str, nltk_root: Path = DEFAULT_NLTK_DATA, corpus_dir: Path = DEFAULT_CORPUS_DIR,
                seed: int = 0, iterations: int = 10, sha256: str | None = None):
    """``kind`` = ``embedded`` (trained from ``corpus_dir``) or ``pretrained`` (NLTK's English tagger, its
    files checked against ``sha256``; the embedded tagger is built from the project's own corpus)."""
    if kind == "embedded":
        return embedded_tagger(corpus_dir, nltk_root, seed, iterations)
    if kind == "pretrained":
        return pretrained_tagger(nltk_root, sha256=sha256)
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

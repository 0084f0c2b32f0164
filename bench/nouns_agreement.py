"""Agreement of the `nouns` stage's phrases with the authors' on TokenCompose's 4,526 training captions.

The nouns stage's own code (``pipeline.text.nouns_rows.tagger_nouns_rows``: tagger, NN* runs,
de-duplication, CLIP alignment) runs over every caption of ``coco_gsam_metadata.jsonl``; its phrases are
compared with the caption's ``attn_list`` phrases (flair ``pos-english`` in the original pipeline).

Comparison: per caption, phrases are lower-cased and their whitespace collapsed, then compared as sets
(the authors' list is de-duplicated the same way). ``recall`` = phrases found by both / phrases in
theirs (the number to report); ``precision`` = found by both / phrases in ours; ``recall_masked`` counts
only their phrases that have a mask (the ones training uses).

Baseline measured in the same run: NLTK's unigram tagger (most frequent tag of each word in the same
corpus, unknown words NN) through the same code. NLTK's released tagger is added when its files are in
``nltk_data/``. Writes ``bench/results/nouns_agreement.json``.

    python bench/nouns_agreement.py [--metadata PATH_OR_URL]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.datasets.tokencompose_metadata import (
    TOKENCOMPOSE_METADATA_URL, image_id_of, read_tokencompose_metadata,
)
from pipeline.runtime import setup_logging, write_json
from pipeline.text.nouns_rows import tagger_nouns_rows
from pipeline.text.tagger import TaggerUnavailable, embedded_tagger, pretrained_tagger, read_tagged_corpus
from pipeline.zoo.sd import clip_tokenizer

REPO = Path(__file__).resolve().parents[1]
LOCAL_METADATA = REPO.parent / "shared" / "data" / "tokencompose" / "coco_gsam_metadata.jsonl"
# the copy beside the checkout when there is one, else the authors' file at its pinned commit
DEFAULT_METADATA = str(LOCAL_METADATA) if LOCAL_METADATA.is_file() else TOKENCOMPOSE_METADATA_URL
OUT = REPO / "bench" / "results" / "nouns_agreement.json"
log = logging.getLogger("bench.nouns_agreement")


def norm(phrase: str) -> str:
    """Lower-cased, whitespace collapsed: how phrases are compared."""
    return " ".join(phrase.lower().split())


def unigram_tagger(sentences):
    """Baseline: each word's most frequent tag in the corpus; unknown words NN."""
    from nltk.tag import DefaultTagger, UnigramTagger

    return UnigramTagger([list(s) for s in sentences], backoff=DefaultTagger("NN"))


def agreement(records: list[dict], rows: list[dict]) -> dict[str, Any]:
    """Set agreement per caption between ``rows`` (nouns rows) and the records' ``attn_list`` phrases."""
    both = theirs = ours = both_masked = theirs_masked = exact = aligned = 0
    for record, row in zip(records, rows):
        mine = {norm(p) for p in row["phrases"]}
        authors = {norm(p) for p, _ in record["attn_list"]}
        masked = {norm(p) for p, m in record["attn_list"] if m}
        both += len(mine & authors)
        theirs += len(authors)
        ours += len(mine)
        both_masked += len(mine & masked)
        theirs_masked += len(masked)
        exact += mine == authors
        aligned += sum(s == "ok" for s in row["phrase_status"])
    return {"recall": both / theirs, "precision": both / ours, "recall_masked": both_masked / theirs_masked,
            "captions_exact": exact / len(records), "phrases_theirs": theirs, "phrases_ours": ours,
            "phrases_both": both, "phrases_ours_aligned": aligned}


def run(name: str, tagger: Any, records: list[dict], tokenizer: Any) -> dict[str, Any]:
    images = [{"image_id": image_id_of(r["file_name"]), "caption": r["text"], "status": "ok"} for r in records]
    start = time.perf_counter()
    rows = tagger_nouns_rows(images, tagger, tokenizer, 76)
    seconds = time.perf_counter() - start
    result = {**agreement(records, rows), "captions_per_s": len(records) / seconds}
    log.info("%s: %s", name, {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metadata", default=DEFAULT_METADATA)
    args = parser.parse_args()
    setup_logging()
    logging.getLogger("pipeline.text").setLevel(logging.WARNING)
    records = read_tokencompose_metadata(args.metadata)
    tokenizer = clip_tokenizer()
    corpus = read_tagged_corpus(REPO / "data" / "tagger")
    nltk_root = REPO / "nltk_data"
    results = {
        "captions": len(records), "corpus_captions": len(corpus), "seed": 0, "tagger_iterations": 10,
        "comparison": "per caption, lower-cased whitespace-collapsed phrase sets",
        "embedded": run("embedded", embedded_tagger(REPO / "data" / "tagger", nltk_root, 0, 10), records, tokenizer),
        "baseline_unigram": run("unigram", unigram_tagger(corpus), records, tokenizer),
    }
    try:
        results["pretrained_nltk"] = run("pretrained", pretrained_tagger(nltk_root, download=False), records,
                                         tokenizer)
    except TaggerUnavailable:
        results["pretrained_nltk"] = None
        log.info("NLTK's averaged_perceptron_tagger_eng not in %s; skipped", nltk_root)
    results["recall_ratio_vs_baseline"] = results["embedded"]["recall"] / results["baseline_unigram"]["recall"]
    results["precision_ratio_vs_baseline"] = (results["embedded"]["precision"]
                                              / results["baseline_unigram"]["precision"])
    write_json(OUT, results)
    log.info("wrote %s", OUT)


if __name__ == "__main__":
    main()

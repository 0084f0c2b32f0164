"""Stage `nouns`: the noun phrases of every training caption and their CLIP token positions.

``phrases: tagger`` extracts runs of NN* words with the embedded or pretrained NLTK tagger (the pretrained
tagger's files checked against ``text.tagger_sha256``, their digest recorded in the metrics);
``phrases: authors`` takes TokenCompose's attn_list phrases from its metadata (``text.metadata``, checked
against ``text.metadata_sha256``).
Deps: artifacts/data/images/ (image_id, caption, status), the tokenizer of ``sd_model``.
Outs: artifacts/nouns/ (shards), metrics/nouns.json. Fails when the skipped share passes text.max_skip_rate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from transformers import CLIPTokenizer

from pipeline.config import ConfigError, load_params, profile_fields, section
from pipeline.datasets.tokencompose_metadata import read_tokencompose_metadata
from pipeline.models import from_pretrained
from pipeline.paths import MODELS_DIR
from pipeline.runtime import run_stage, stage_argument, write_json
from pipeline.store.identity import code_digest, fingerprint_of
from pipeline.store.shards import iter_rows, read_shards, write_shards
from pipeline.text import tagger as tagging
from pipeline.text.authors_phrases import authors_nouns_rows
from pipeline.text.nouns_rows import TextCfg, TextScale, check_skip_rate, summarize, tagger_nouns_rows

log = logging.getLogger("stages.nouns")
IMAGES, OUT, METRICS = Path("artifacts/data/images"), Path("artifacts/nouns"), Path("metrics/nouns.json")


@dataclass(frozen=True)
class TokenizerScale:
    sd_model: str


def main() -> None:
    params = load_params()
    cfg = section(params, "text", TextCfg)
    scale = section(params, "profile.text", TextScale)
    model = profile_fields(params, TokenizerScale)
    tokenizer = from_pretrained(CLIPTokenizer, model.sd_model, MODELS_DIR, subfolder="tokenizer")
    images = read_shards(IMAGES, columns=["image_id", "caption", "status", "error"]).to_dict("records")
    recorded = {}
    if scale.phrases == "tagger":
        tagger = tagging.load_tagger(scale.tagger, tagging.DEFAULT_NLTK_DATA, tagging.DEFAULT_CORPUS_DIR,
                                     params["seed"], cfg.tagger_iterations, scale.tagger_sha256)
        source = {"tagger": scale.tagger, "corpus": tagging.corpus_fingerprint(
            tagging.read_tagged_corpus(tagging.DEFAULT_CORPUS_DIR), params["seed"], cfg.tagger_iterations)}
        if scale.tagger == "pretrained":  # other tagger files compute the shards again
            source["tagger_sha256"] = recorded["tagger_sha256"] = tagging.tagger_digest(
                tagging.pretrained_dir(tagging.DEFAULT_NLTK_DATA))

        def process(rows):
            return tagger_nouns_rows(rows, tagger, tokenizer, cfg.max_token_index)
    else:
        if not scale.metadata:
            raise ConfigError(f"profiles.{params['profile']}.text.metadata: phrases: authors needs the path "
                              "or URL of TokenCompose's metadata.jsonl")
        records = read_tokencompose_metadata(scale.metadata, sha256=scale.metadata_sha256,
                                             param=f"profiles.{params['profile']}.text.metadata_sha256")
        source = {"metadata": fingerprint_of(records)}

        def process(rows):
            return authors_nouns_rows(rows, records, tokenizer, cfg.max_token_index)

    fingerprint = {"images": fingerprint_of(images), "source": source, "max_token_index": cfg.max_token_index,
                   "tokenizer": model.sd_model}
    write_shards(OUT, images, process, scale.shard_size, fingerprint, code=code_digest("pipeline.text.nouns_rows", "pipeline.text.authors_phrases"), desc="nouns")
    metrics = summarize(iter_rows(OUT, columns=["status", "phrase_status"]))
    metrics.update(profile=params["profile"], phrases_source=scale.phrases, tagger=scale.tagger,
                   tokenizer=model.sd_model, max_token_index=cfg.max_token_index, max_skip_rate=cfg.max_skip_rate,
                   **recorded)
    write_json(METRICS, metrics)
    log.info("nouns: %d captions, %d phrases, %d aligned, %d skipped", metrics["captions"], metrics["phrases"],
             metrics["aligned"], metrics["skipped"])
    check_skip_rate(metrics, cfg.max_skip_rate)


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)

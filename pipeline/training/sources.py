"""Where training records come from, and the checks on them (SPEC §1.5).

:func:`load_records` joins the ``images`` shards (split "train") with the ``masks`` rows and counts each
reason a row was not used (undecodable images are counted, and past ``train.max_corrupt_rate`` an error
names the repair); :func:`object_mask_records` reads the images' own object masks (the demo set).
What the loaded records hold is part of a run's key through :func:`pipeline.training.records.data_fingerprint`,
so the training loop does not import this module: editing how records are loaded keeps a run's checkpoints
unless the records themselves change.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError, InputDataError
from pipeline.geometry import train_mask
from pipeline.store.codecs import decode_error, rle_decode, rle_encode
from pipeline.store.shards import STATUS_OK, iter_rows
from pipeline.training.losses import LossCfg
from pipeline.training.records import MAX_TOKENS, TrainRecord, WordTarget

log = logging.getLogger(__name__)

# Mask statuses of a word whose target is empty at the training resolution: SAM found no pixel, the mask lies
# outside the centre crop, or the authors' PNG is all black. The original trained these words towards an
# all-zero target (token loss the constant 1, BCE pushing the word's attention to 0; SPEC §1.4, §1.6 item 7).
EMPTY_TARGET_STATUSES = ("empty_mask", "outside_crop", "blank_mask")

# Reasons an ``ok`` mask row of a training image cannot be used: the masks do not fit the images (other
# captions, resolution or tokenizer), not an outcome of masking; a few of them mean stale or foreign masks.
MISMATCH_REASONS = ("no_train_mask", "no_token_indices", "token_index_out_of_range", "train_mask_size",
                    "caption_mismatch")


def _word_problem(row: dict, caption: str | None, resolution: int, zero_targets: bool = True) -> str | None:
    """Why a masks row cannot supervise training (a reason code), or None when it can.

    With ``zero_targets``, rows of :data:`EMPTY_TARGET_STATUSES` can (their ``train_mask`` is empty)."""
    if row.get("status") != STATUS_OK and not (zero_targets and row.get("status") in EMPTY_TARGET_STATUSES):
        return f"mask_status_{row.get('status')}"
    if caption is None:
        return "image_not_in_train_split"
    if row.get("train_mask") is None:
        return "no_train_mask"
    indices = list(row.get("token_indices") or [])
    if not indices:
        return "no_token_indices"
    if max(indices) >= MAX_TOKENS - 1 or min(indices) < 1:  # 76 holds EOT after truncation
        return "token_index_out_of_range"
    if list(row["train_mask"]["size"]) != [resolution, resolution]:
        return "train_mask_size"
    if row.get("caption") != caption:
        return "caption_mismatch"
    return None


def load_records(images_dir: Path, masks_dir: Path | None, resolution: int, skip_ungrounded: bool = False,
                 max_word_skip_rate: float | None = None, empty_masks: str = "zero_target",
                 max_corrupt_rate: float | None = None) -> tuple[list[TrainRecord], dict[str, int]]:
    """Training images (split "train", status ok) joined by ``image_id`` with their usable mask rows.

    Words of :data:`EMPTY_TARGET_STATUSES` train towards an all-zero mask (``empty_masks="zero_target"``, the
    original) or are skipped (``"skip"``). Images whose bytes do not decode are left out and counted
    (``images_corrupt``, one warning line naming the first few); with ``max_corrupt_rate``, a larger share
    of them among the ``ok`` training images raises an error naming the repair (:func:`check_corrupt_images`).
    Returns the records (sorted by image id) and counts: images,
    grounded/ungrounded images, words used (``words_zero_target`` of them with an empty mask), and one
    ``words_skipped_<reason>`` count per reason a mask row was not used. Images without any usable
    word train on the denoising loss only, or are left out when ``skip_ungrounded``. With
    ``max_word_skip_rate``, raises when a larger share of the ``ok`` mask rows of training images does not
    fit them (:data:`MISMATCH_REASONS`: masks made for other captions, resolution or tokenizer).
    """
    if empty_masks not in ("zero_target", "skip"):
        raise ConfigError(f"train.empty_masks must be 'zero_target' or 'skip', got {empty_masks!r}")
    records, stats, corrupt = _train_images(images_dir)
    if corrupt:
        total = len(corrupt) + len(records)
        if max_corrupt_rate is not None:
            check_corrupt_images(corrupt, total, max_corrupt_rate, images_dir)
        log.warning("%d of %d training images in %s do not decode and are left out (first: %s); `dvc repro "
                    "train_data` recomputes the damaged shards", len(corrupt), total, images_dir, _first(corrupt))
    if masks_dir is not None:
        _attach_words(records, masks_dir, resolution, stats, zero_targets=empty_masks == "zero_target")
    used, stats = _select(records, skip_ungrounded, stats)
    if masks_dir is not None and max_word_skip_rate is not None:
        check_word_skips(stats, max_word_skip_rate, masks_dir)
    return used, stats


FIRST_NAMED = 5  # undecodable training images named in the warning and the error


def _train_images(images_dir: Path) -> tuple[dict[str, TrainRecord], dict[str, int], list[str]]:
    """Records (no words yet) of the decodable ``ok`` images of split "train", by id, the skip counts, and the
    ids of the ``ok`` training images whose bytes do not decode."""
    records: dict[str, TrainRecord] = {}
    stats: dict[str, int] = {"images_not_ok": 0, "images_other_split": 0, "images_corrupt": 0}
    corrupt: list[str] = []
    for row in iter_rows(images_dir, columns=["image_id", "image", "caption", "split", "status"]):
        if row["status"] != STATUS_OK:
            stats["images_not_ok"] += 1
        elif row["split"] != "train":
            stats["images_other_split"] += 1
        elif decode_error(row["image"]) is not None:
            corrupt.append(str(row["image_id"]))
        else:
            records[str(row["image_id"])] = TrainRecord(str(row["image_id"]), row["image"], row["caption"])
    stats["images_corrupt"] = len(corrupt)
    return records, stats, corrupt


def _first(ids: list[str]) -> str:
    """The first :data:`FIRST_NAMED` of ``ids``, comma-separated (``...`` when there are more)."""
    return ", ".join(ids[:FIRST_NAMED]) + (", ..." if len(ids) > FIRST_NAMED else "")


def check_corrupt_images(corrupt: list[str], total: int, limit: float, images_dir: Path) -> None:
    """Raise when more than ``limit`` of the ``total`` ``ok`` training images of ``images_dir`` do not decode
    (``corrupt``: their ids). The one-line message names the producer's repair command: a rerun of
    ``train_data`` verifies its shards and recomputes the damaged ones."""
    if total and len(corrupt) / total > limit:
        raise InputDataError(f"{len(corrupt)} of {total} training images in {images_dir} do not decode (first: "
                             f"{_first(corrupt)}; limit train.max_corrupt_rate={limit:.1%}); repair them with "
                             f"`dvc repro train_data` (it recomputes damaged shards), or raise "
                             f"train.max_corrupt_rate")


def check_word_skips(stats: dict[str, int], limit: float, masks_dir: Path) -> None:
    """Raise when more than ``limit`` of the joinable mask rows were dropped for a :data:`MISMATCH_REASONS`."""
    dropped = {r: stats.get(f"words_skipped_{r}", 0) for r in MISMATCH_REASONS}
    dropped = {r: n for r, n in dropped.items() if n}
    total = stats.get("words_used", 0) + sum(dropped.values())
    if total and sum(dropped.values()) / total > limit:
        raise InputDataError(f"{masks_dir}: {sum(dropped.values())} of {total} mask rows of training images do "
                             f"not fit them ({dropped}; limit train.max_word_skip_rate={limit:.1%}). The masks were "
                             f"made for other captions, resolution or tokenizer: rerun `dvc repro masks`")


def _attach_words(records: dict[str, TrainRecord], masks_dir: Path, resolution: int, stats: dict,
                  zero_targets: bool) -> None:
    """Append each usable masks row to its record's words; count the rows skipped, by reason."""
    columns = ["image_id", "caption", "phrase", "token_indices", "train_mask", "status"]
    empty = rle_encode(np.zeros((resolution, resolution), dtype=bool))
    stats["words_zero_target"] = 0
    for row in iter_rows(masks_dir, columns=columns):
        record = records.get(str(row["image_id"]))
        zero = zero_targets and row.get("status") in EMPTY_TARGET_STATUSES
        if zero and row.get("train_mask") is None:  # blank authors' PNG: no mask was stored
            row = {**row, "train_mask": empty}
        problem = _word_problem(row, record.caption if record else None, resolution, zero_targets)
        if problem is not None:
            stats[f"words_skipped_{problem}"] = stats.get(f"words_skipped_{problem}", 0) + 1
            continue
        stats["words_zero_target"] += int(zero)
        record.words.append(WordTarget(row["phrase"], [int(i) for i in row["token_indices"]], row["train_mask"]))


def _select(records: dict[str, TrainRecord], skip_ungrounded: bool, stats: dict):
    """The records to train on, sorted by id (only grounded ones with ``skip_ungrounded``), and the counts."""
    ordered = [records[k] for k in sorted(records)]
    grounded = [r for r in ordered if r.words]
    stats.update(images_train=len(ordered), images_grounded=len(grounded),
                 images_ungrounded=len(ordered) - len(grounded), words_used=sum(len(r.words) for r in ordered))
    used = grounded if skip_ungrounded else ordered
    stats["images_used"] = len(used)
    if not used:
        grounded_only = " that have an aligned mask (train.skip_ungrounded is on)" if skip_ungrounded else ""
        raise InputDataError(f"no training images: the images stage wrote no ok rows with split 'train'{grounded_only}")
    return used, stats


def check_grounded(stats: dict, loss: LossCfg) -> None:
    """Refuse a run whose grounding losses could never apply: weights > 0 but no image has an aligned mask
    (``stats`` from :func:`load_records`), which would silently be plain fine-tuning."""
    if stats["images_grounded"] == 0 and (loss.token_weight or loss.pixel_weight):
        raise InputDataError("no training image has an aligned mask, so the token and pixel losses would never "
                             "apply; check the masks stage (status counts in metrics/masks.json), or set "
                             "loss.token_weight=0 and loss.pixel_weight=0 to fine-tune on the denoising loss only")


def object_mask_records(images_dir: Path, tokenizer: Any, resolution: int, split: str) -> tuple[list[TrainRecord], int]:
    """Records of ``split`` supervised by the images' own ``objects`` masks (the demo set's true masks).

    Each object name is aligned to the caption's CLIP tokens (:func:`pipeline.text.align.align_phrase` at the
    name's position in the caption); its mask goes through :func:`pipeline.geometry.train_mask`, as the
    ``masks`` stage's ``train_mask`` column. Returns the records (sorted by id) and the number of objects that
    did not align (left out).
    """
    from pipeline.text.align import CaptionTokens, align_phrase, locate_phrases

    records, unaligned = [], 0
    for row in iter_rows(images_dir):
        if row["status"] != STATUS_OK or row["split"] != split:
            continue
        record = TrainRecord(str(row["image_id"]), row["image"], row["caption"])
        tokens = CaptionTokens.of(tokenizer, row["caption"])
        names = [o["name"] for o in row["objects"]]
        for obj, start in zip(row["objects"], locate_phrases(row["caption"], names)):
            align = align_phrase(tokenizer, tokens, obj["name"], start=start, caption_id=record.image_id)
            if not align.ok:
                unaligned += 1
                continue
            small = train_mask(rle_decode(obj["mask"]), resolution)
            record.words.append(WordTarget(obj["name"], align.indices, rle_encode(small)))
        records.append(record)
    return sorted(records, key=lambda r: r.image_id), unaligned

"""Photorealism stages: reference sets (COCO, Flickr30K Entities, demo), FID sampling with A&E token indices,
FID and CLIP score from cached reference statistics, latency, and the report's section."""

from __future__ import annotations

import io
import json
import runpy
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from pipeline.config import InputDataError, MissingInputError, StageError
from pipeline.photorealism import features
from pipeline.photorealism.latency import call_times, hardware_name, latency_record
from pipeline.photorealism.real_images import square_image
from pipeline.photorealism.references import build_reference, coco_captions_json, entity_sentence_text, image_row
from pipeline.photorealism.sampling import (CaptionSampler, caption_items, caption_token_indices,
                                            head_word_indices)
from pipeline.photorealism.scoring import ReferenceMismatchError, reference_stats
from pipeline.photorealism.settings import ReferenceSpec
from pipeline.report.blocks import Figure, Table
from pipeline.report.photorealism import photorealism_section, reference_sets
from pipeline.report.published import load_published
from pipeline.sampling.items import SampleItem
from pipeline.store.codecs import png_bytes
from pipeline.store.shards import read_shards

REPO = Path(__file__).resolve().parents[1]


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


# --- reference sets ----------------------------------------------------------------------------------------

@pytest.fixture()
def coco_files(tmp_path):
    """A COCO-format captions file over 3 images (7 captions), the images in a folder, and the same JSON in a zip."""
    images = tmp_path / "val2017"
    images.mkdir()
    doc = {"images": [], "annotations": []}
    for n, image_id in enumerate((139, 285, 632)):
        name = f"{image_id:012d}.jpg"
        (images / name).write_bytes(_jpeg((40 * n, 90, 200)))
        doc["images"].append({"id": image_id, "file_name": name})
    for k in range(7):
        doc["annotations"].append({"id": 100 + k, "image_id": (139, 285, 632)[k % 3], "caption": f" A  dog {k} ."})
    captions = tmp_path / "captions_val2017.json"
    captions.write_text(json.dumps(doc))
    archive = tmp_path / "annotations_trainval2017.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("annotations/captions_val2017.json", json.dumps(doc))
    return captions, archive, images


def test_coco_reference_draws_captions_and_keeps_every_image(coco_files):
    captions, archive, images = coco_files
    spec = ReferenceSpec(source="coco", captions=str(captions), image_base_url=images.as_uri(), num_captions=4)
    ref = build_reference("coco", spec, seed=0, param="profiles.paper.fid.references.coco")
    assert len(ref.captions) == 4 and len({c["caption_id"] for c in ref.captions}) == 4
    assert ref.captions[0]["text"].startswith("A dog") and ref.captions[0]["text"].endswith(".")  # cleaned
    assert [j.image_id for j in ref.images] == ["000000000139", "000000000285", "000000000632"]
    assert build_reference("coco", spec, 0, "p").captions == ref.captions  # same seed, same draw
    assert build_reference("coco", spec, 1, "p").captions != ref.captions  # another seed, another draw
    zipped = build_reference("coco", ReferenceSpec(source="coco", captions=str(archive),
                                                   image_base_url=str(images), num_captions=4), 0, "p")
    assert zipped.captions == ref.captions  # the annotations zip gives the same captions
    row = image_row(ref.images[1], seed=0)
    assert row["status"] == "ok" and row["image"] == (images / "000000000285.jpg").read_bytes()  # never re-encoded
    with pytest.raises(InputDataError, match="only 7"):
        build_reference("coco", ReferenceSpec(source="coco", captions=str(captions), image_base_url=str(images),
                                              num_captions=8), 0, "p")


def test_coco_captions_errors_name_the_file(tmp_path):
    with pytest.raises(InputDataError, match="captions_val2017.json"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("annotations/instances_val2017.json", "{}")
        coco_captions_json(buf.getvalue(), "ann.zip")
    with pytest.raises(InputDataError, match="not a COCO captions file"):
        coco_captions_json(b'{"images": []}', "x.json")


def test_missing_reference_image_is_a_recorded_failure(coco_files):
    captions, _, images = coco_files
    (images / "000000000632.jpg").unlink()
    ref = build_reference("coco", ReferenceSpec(source="coco", captions=str(captions),
                                                image_base_url=images.as_uri()), 0, "p")
    row = image_row(ref.images[2], seed=0)
    assert row["status"] == "download_failed" and "000000000632.jpg" in row["error"] and row["image"] is None


@pytest.fixture()
def flickr_root(tmp_path):
    root = tmp_path / "flickr30k"
    (root / "Sentences").mkdir(parents=True)
    (root / "flickr30k-images").mkdir()
    (root / "val.txt").write_text("1000092795\n10002456\n")
    for n, image_id in enumerate(("1000092795", "10002456")):
        (root / "flickr30k-images" / f"{image_id}.jpg").write_bytes(_jpeg((n * 100, 20, 30)))
        (root / "Sentences" / f"{image_id}.txt").write_text(
            f"[/EN#18/people A child] in [/EN#19/clothing a pink dress] is climbing {n} .\n"
            f"[/EN#1/people/other Two men] play [/EN#2/other ball] {n} .\n")
    return root


def test_flickr30k_reference_one_caption_per_val_image(flickr_root):
    ref = build_reference("flickr30k", ReferenceSpec(source="flickr30k_entities", root=str(flickr_root)), 0, "p")
    assert [c["image_id"] for c in ref.captions] == ["1000092795", "10002456"]
    assert all("[" not in c["text"] and "/EN#" not in c["text"] for c in ref.captions)
    assert [j.image_id for j in ref.images] == ["1000092795", "10002456"]
    assert entity_sentence_text("[/EN#18/people A child] in [/EN#19/clothing a pink dress] runs .") == \
        "A child in a pink dress runs."
    assert entity_sentence_text("[/EN#1/people/other Two men] play .") == "Two men play."


def test_flickr30k_missing_files_name_the_folder_and_param(flickr_root):
    (flickr_root / "flickr30k-images" / "10002456.jpg").unlink()
    with pytest.raises(MissingInputError, match=r"10002456\.jpg.*profiles\.paper\.fid\.references\.flickr30k\.root"):
        build_reference("flickr30k", ReferenceSpec(source="flickr30k_entities", root=str(flickr_root)), 0,
                        "profiles.paper.fid.references.flickr30k")
    with pytest.raises(MissingInputError, match="request form"):
        build_reference("f", ReferenceSpec(source="flickr30k_entities", root=str(flickr_root / "nope")), 0, "p")


def test_reference_spec_requires_the_fields_of_its_source():
    with pytest.raises(ValueError, match="captions, image_base_url"):
        ReferenceSpec(source="coco")
    with pytest.raises(ValueError, match="root"):
        ReferenceSpec(source="flickr30k_entities")


def test_square_image_crops_the_centre_and_resizes():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 10:30] = 255  # the centre square is white, the sides black
    out = square_image(Image.fromarray(pixels), 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8 and out.min() == 255


# --- A&E token indices of free captions ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tagger():
    from pipeline.text.tagger import load_tagger

    return load_tagger("embedded")


def test_caption_token_indices_are_the_head_words_of_the_nouns(tagger, clip_tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    from pipeline.zoo.sd import save_clip_tokenizer

    save_clip_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert caption_token_indices(tagger, tok, "a cat sitting on a red bench.", 75) == (2, 7)
    pieces = caption_token_indices(tagger, tok, "two surfboards on the beach", 75)
    assert tok.decode([tok("two surfboards on the beach").input_ids[i] for i in pieces[:2]]) == "surfboards"
    reason = caption_token_indices(tagger, tok, "very quickly.", 75)
    assert isinstance(reason, str) and "no noun phrase" in reason
    assert head_word_indices(tok, "red bench", [6, 7]) == [7]


def test_caption_sampler_takes_the_indices_of_the_item():
    items = caption_items("coco", [{"text": "a cat."}, {"text": "quickly."}], [(2,), "no noun"])
    assert items[0].promptset == "fid_coco" and items[1].prompt_id == 1 and items[0].image_index == 0
    sampler = CaptionSampler.__new__(CaptionSampler)
    assert sampler.token_indices(items[0]) == [2] and sampler.token_indices(items[1]) == "no noun"
    assert caption_items("coco", [{"text": "a cat."}])[0].token_indices == ()


# --- FID from cached reference statistics (stages in a scratch project) ---------------------------------------

@pytest.fixture(scope="module")
def fid_project(tmp_path_factory, embedded):
    """A demo project with fid_data, fid_reference and fid_sample@sd14 run (6 real images per set, 2 steps)."""
    root = tmp_path_factory.mktemp("fid_project")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    demo = params["profiles"]["demo"]
    demo["fid"]["references"] = {"coco": {"source": "demo", "num_images": 6},
                                 "flickr30k": {"source": "demo", "num_images": 5}}
    demo["sampling"].update(num_inference_steps=2, batch_size=3, shard_size=3)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    models = root / "artifacts" / "models"
    models.mkdir(parents=True)
    for name in ("tiny-sd", "tiny-openclip"):
        (models / name).symlink_to(embedded(name))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage, args in (("fid_data", []), ("fid_reference", []), ("fid_sample", ["sd14"])):
            mp.setattr("sys.argv", [stage, *args])
            runpy.run_path(str(REPO / "stages" / f"{stage}.py"), run_name="__main__")
    return root


def test_fid_stage_reads_the_reference_statistics_without_recomputing_them(fid_project, monkeypatch):
    """Two runs of fid@sd14: the extractor sees only the 11 generated images each time, never the real ones,
    and the cached statistics file is not rewritten."""
    ref_file = fid_project / "artifacts" / "fid" / "reference" / "coco.npz"
    before = (ref_file.stat().st_mtime_ns, ref_file.read_bytes())
    seen = []
    forward = features.TinyFeatureExtractor._forward
    monkeypatch.setattr(features.TinyFeatureExtractor, "_forward",
                        lambda self, batch: seen.append(batch.shape[0]) or forward(self, batch))
    monkeypatch.chdir(fid_project)
    for run in (1, 2):
        monkeypatch.setattr("sys.argv", ["fid", "sd14"])
        runpy.run_path(str(REPO / "stages" / "fid.py"), run_name="__main__")
        assert sum(seen) == 11 * run
    assert (ref_file.stat().st_mtime_ns, ref_file.read_bytes()) == before
    metrics = json.loads((fid_project / "metrics" / "fid" / "sd14.json").read_text())
    assert metrics["coco"]["images"] == 6 and metrics["flickr30k"]["images"] == 5
    assert metrics["coco"]["real_images"] == 6 and np.isfinite(metrics["coco"]["fid"]) and metrics["coco"]["fid"] > 0
    assert 0 <= metrics["coco"]["clip_score"] <= 100 and metrics["sampler"]["steps"] == 2
    clip = pd.read_csv(fid_project / "plots" / "clip_score" / "sd14.csv")
    assert clip["reference"].tolist() == ["coco"] * 6 + ["flickr30k"] * 5 and clip["prompt_id"].tolist()[:6] == \
        list(range(6))
    assert clip[clip["reference"] == "coco"]["clip_score"].mean() == pytest.approx(metrics["coco"]["clip_score"])
    rows = read_shards(fid_project / "artifacts" / "fid_samples" / "sd14" / "coco", columns=["prompt", "status"])
    captions = json.loads((fid_project / "artifacts/data/fid/captions/coco.json").read_text())["captions"]
    assert rows["prompt"].tolist() == [c["text"] for c in captions] and set(rows["status"]) == {"ok"}


def test_reference_statistics_of_another_extractor_are_refused(fid_project):
    ref_dir = fid_project / "artifacts" / "fid" / "reference"
    record = json.loads((ref_dir / "reference.json").read_text())
    assert reference_stats("coco", record["extractor"], ref_dir).count == 6
    other = {**record["extractor"], "weights_sha256": "0" * 64}
    with pytest.raises(ReferenceMismatchError, match="dvc repro fid_reference"):
        reference_stats("coco", other, ref_dir)
    with pytest.raises(MissingInputError, match="ade20k"):
        reference_stats("ade20k", record["extractor"], ref_dir)


def test_fid_of_the_reference_images_against_themselves_is_zero(fid_project):
    """The real images through the stage's path (square crop, extractor, streamed stats) against the saved
    statistics: FID 0 to float tolerance."""
    from pipeline.photorealism.fid import fid_of
    from pipeline.photorealism.real_images import real_image_batches

    ref_dir = fid_project / "artifacts" / "fid" / "reference"
    extractor, identity = features.open_extractor("embedded", ref_dir / "extractor")
    again = extractor.stats(real_image_batches(fid_project / "artifacts/data/fid/images/coco", 128, 4))
    assert fid_of(again, reference_stats("coco", identity, ref_dir)) == pytest.approx(0.0, abs=1e-6)


# --- latency --------------------------------------------------------------------------------------------------

class _FakeSampler:
    """Sampler stand-in: ``rows`` returns ok rows; the clock advances 0.5 s per image of a call."""

    def __init__(self, batch_size: int, fail: bool = False):
        self.scale = SimpleNamespace(batch_size=batch_size, num_inference_steps=50)
        self.pipe = SimpleNamespace(unet=SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32))
        self.size, self.now, self.calls, self.fail = 64, 0.0, [], fail

    def clock(self) -> float:
        return self.now

    def rows(self, items):
        self.calls.append(len(items))
        self.now += 0.5 * len(items) + (10.0 if len(self.calls) == 1 else 0.0)  # a slow first (warm-up) call
        return [{"status": "failed" if self.fail else "ok", "prompt": it.text, "error": "boom"} for it in items]


def test_call_times_skip_warmup_and_divide_by_images():
    sampler = _FakeSampler(batch_size=2)
    items = [SampleItem("coco", i, 0, f"p{i}", ()) for i in range(3)]
    times = call_times(sampler, items, images=5, warmup=1, clock=sampler.clock)
    assert sampler.calls == [2, 2, 2, 2] and times == [0.5, 0.5, 0.5]  # ceil(5 / 2) timed calls after 1 warm-up
    record = latency_record(times, sampler.scale, sampler)
    assert record["seconds_per_image"] == 0.5 and record["images"] == 6 and record["timed_calls"] == 3
    assert latency_record([0.4], sampler.scale, sampler)["seconds_per_image_std"] is None
    with pytest.raises(StageError, match="p0"):
        failing = _FakeSampler(batch_size=1, fail=True)
        call_times(failing, items, images=1, warmup=0, clock=failing.clock)
    assert "cores" in hardware_name(torch.device("cpu"))


# --- report ---------------------------------------------------------------------------------------------------

def test_photorealism_section_sets_this_run_beside_the_published_columns():
    published = load_published(REPO / "data" / "published.yaml")["multigen"]
    fid = {m: {"extractor": "inception-v3-compat", "clip_model": "ViT-L-14:openai", "sampler": {"steps": 50},
               "coco": {"fid": f, "clip_score": 31.0, "clip_score_std": 2.0, "images": 10, "real_images": 5},
               "flickr30k": {"fid": f + 50, "clip_score": 30.0, "clip_score_std": 2.5, "images": 4, "real_images": 4}}
           for m, f in (("sd14", 21.0), ("trained", 20.5))}
    latency = {"sd14": {"hardware": "GPU X", "original": {"seconds_per_image": 7.0, "seconds_per_image_std": 0.1},
                        "pipeline": {"seconds_per_image": 1.0, "seconds_per_image_std": None}}}
    multigen = {"sd14": {"coco_mg3": 50.0}, "trained": {"coco_mg3": 75.0}}
    section = photorealism_section(fid, latency, multigen, published, "paper")
    table = next(b for b in section.blocks if isinstance(b, Table) and b.name == "photorealism")
    assert table.columns[2:6] == ["FID (COCO) ↓", "FID (Flickr30K) ↓", "CLIP score (COCO) ↑",
                                  "CLIP score (Flickr30K) ↑"]
    assert table.rows[0] == ["sd14", "this run (paper)", "21.00", "71.00", "31.00(2.00)", "30.00(2.50)",
                             "7.00(0.10)", "1.00"]
    assert table.rows[1][-2:] == ["—", "—"]  # trained has no latency file
    assert table.rows[2] == ["SD 1.4", "published (mlpc-ucsd/TokenCompose)", "20.88", "71.46", "—", "—",
                             "7.54(0.17)", "—"]
    assert any("GPU X" in getattr(b, "text", "") for b in section.blocks)
    assert any("no interval" in getattr(b, "text", "") for b in section.blocks)
    assert [b.name for b in section.blocks if isinstance(b, Figure)] == ["fid_vs_mg.png"]
    empty = photorealism_section({}, {}, {}, published, "demo")
    assert sum(getattr(b, "kind", "") == "missing" for b in empty.blocks) == 2
    assert reference_sets({}) == ["coco", "flickr30k"]


def test_demo_reference_images_are_drawn_deterministically():
    spec = ReferenceSpec(source="demo", num_images=3)
    first, again = build_reference("coco", spec, 0, "p"), build_reference("coco", spec, 0, "p")
    assert first.captions == again.captions and len(first.captions) == 3
    assert image_row(first.images[0], 0)["image"] == image_row(again.images[0], 0)["image"]
    assert image_row(first.images[0], 0)["image"] != png_bytes(np.zeros((4, 4, 3), np.uint8))


def _fid_data_project(root: Path, references: dict) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profiles"]["demo"]["fid"].update(references=references, shard_size=2)
    params["fid"]["max_failed_rate"] = 0.5
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def _run_fid_data(root: Path, monkeypatch) -> dict:
    monkeypatch.chdir(root)
    monkeypatch.setattr("sys.argv", ["fid_data"])
    runpy.run_path(str(REPO / "stages" / "fid_data.py"), run_name="__main__")
    return json.loads((root / "metrics" / "fid_data.json").read_text())


def test_fid_data_stage_fetches_coco_checks_digests_and_repairs_damaged_shards(coco_files, tmp_path, monkeypatch):
    """COCO-format source through the stage: 4 drawn captions, all 3 images stored as served with their
    SHA-256, the caption file's digest in the metrics; a damaged shard is fetched again; a failed download is
    retried, and an image of its shard that changed at its source meanwhile stops the run instead of mixing
    two versions of the set."""
    import hashlib

    captions, _, images = coco_files
    project = tmp_path / "project"
    project.mkdir()
    _fid_data_project(project, {"coco": {"source": "coco", "captions": str(captions),
                                         "image_base_url": images.as_uri(), "num_captions": 4}})
    metrics = _run_fid_data(project, monkeypatch)
    assert metrics["coco"] == {"source": "coco", "source_sha256": hashlib.sha256(captions.read_bytes()).hexdigest(),
                               "captions": 4, "real_images": 3, "failed": {}}
    out = project / "artifacts/data/fid/images/coco"
    rows = read_shards(out)
    assert rows["image_sha256"].tolist() == [hashlib.sha256((images / f"{i}.jpg").read_bytes()).hexdigest()
                                             for i in rows["image_id"]]
    shard = sorted(out.glob("part-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # damaged after it was written
    _run_fid_data(project, monkeypatch)  # same source: fetched again, same bytes
    assert read_shards(out)["image_sha256"].tolist() == rows["image_sha256"].tolist()
    second = images / "000000000285.jpg"
    kept = second.read_bytes()
    second.unlink()
    shard.unlink()
    assert _run_fid_data(project, monkeypatch)["coco"]["failed"] == {"download_failed": 1}
    second.write_bytes(kept)
    (images / "000000000139.jpg").write_bytes(_jpeg((1, 2, 3), (30, 30)))  # changed at the source meanwhile
    with pytest.raises(InputDataError, match="000000000139.*changed at its source.*references.coco"):
        _run_fid_data(project, monkeypatch)  # the failed download's shard is redone: 139 is fetched again


def test_fid_data_stops_when_the_first_downloads_all_fail(tmp_path, monkeypatch):
    from pipeline.fetch import FetchError
    from pipeline.photorealism.references import ImageJob, image_rows

    jobs = [ImageJob(f"{i:012d}", (tmp_path / f"missing{i}.jpg").as_uri()) for i in range(16)]
    (tmp_path / "out").mkdir()  # write_shards creates it before the first shard
    with pytest.raises(FetchError, match="first 16 reference images all failed.*references.coco"):
        image_rows(0, tmp_path / "out", "profiles.paper.fid.references.coco")(jobs)

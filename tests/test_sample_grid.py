"""The MultiGen sample grid: cells read from sample and detection shards, their captions, and the figure."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets.multigen_files import MultiGenPrompt
from pipeline.figures import grouped_bars, image_grid
from pipeline.multigen.detection import STATUS_NO_IMAGE
from pipeline.multigen.found import objects_found
from pipeline.sample_grid import (SampleGridCfg, grid_cells, grid_models, multigen_rule, multigen_verdict,
                                  sample_grid_figure, spatial_rule, spatial_verdict)
from pipeline.sampling.sampler import STATUS_FAILED
from pipeline.store.codecs import png_bytes
from pipeline.store.shards import STATUS_OK, shard_path, write_table
from pipeline.visor import SpatialPrompt

OBJECTS = ["cat", "dog", "cup", "kite", "boat"]
PROMPTS = [MultiGenPrompt(i, f"prompt {i}", tuple(OBJECTS)) for i in range(5)]


def solid(colour: tuple[int, int, int], size: int = 24) -> bytes:
    return png_bytes(np.full((size, size, 3), colour, np.uint8))


def sample(prompt_id, image_index, image, status=STATUS_OK):
    return {"prompt_id": prompt_id, "image_index": image_index, "prompt": f"prompt {prompt_id}",
            "objects": OBJECTS, "image": image, "status": status, "error": ""}


def detection(prompt_id, image_index, scores, status=STATUS_OK):
    return {"prompt_id": prompt_id, "image_index": image_index, "objects": OBJECTS, "label_max_scores": scores,
            "status": status, "error": ""}


def test_multigen_verdict_counts_what_mg_scoring_counts():
    scores = [0.5, 0.1, 0.11, 0.0, float(np.float32(0.1))]  # 0.1 and float32(0.1) are not above 0.1
    assert multigen_verdict(OBJECTS, scores, 0.1) == "2/5 found; missed: dog, kite, boat"
    assert objects_found(OBJECTS, scores, 0.1) == 2
    assert multigen_verdict(OBJECTS, [0.9] * 5, 0.1) == "5/5 found"
    assert multigen_verdict(["cat", "cat", "dog"], [0.0, 0.5, 0.0], 0.1) == "1/2 found; missed: dog"  # distinct


def test_spatial_verdict_follows_visor_rules():
    """"a cat to the left of a dog": labels 0 = cat, 1 = dog; centres (x, y); boxes at or below 0.1 do not count."""
    prompt = SpatialPrompt(7, "a cat to the left of a dog", ("cat", "dog"), relation="to the left of")

    def row(boxes):  # (score, label, x, y)
        return {"box_scores": [b[0] for b in boxes], "box_labels": [b[1] for b in boxes],
                "box_centers": [(b[2], b[3]) for b in boxes]}

    assert spatial_verdict(prompt, row([(0.5, 0, 10, 50), (0.5, 1, 90, 50)]), 0.1) == "both found; relation holds"
    assert spatial_verdict(prompt, row([(0.5, 0, 90, 50), (0.5, 1, 10, 50)]), 0.1) == "both found; relation fails"
    assert spatial_verdict(prompt, row([(0.5, 0, 10, 50), (0.1, 1, 90, 50)]), 0.1) == "missed: dog"
    assert spatial_verdict(prompt, row([]), 0.1) == "missed: cat, dog"


def test_cells_take_the_chosen_image_of_each_prompt_and_say_why_one_is_missing(tmp_path):
    """Prompt 0: image 1 is chosen, not image 0; 1: sampling failed; 2: never sampled; 3: not detected;
    4: bytes that do not decode. Shards split across files, as the sample stage writes them."""
    samples, detections = tmp_path / "samples", tmp_path / "detections"
    samples.mkdir(), detections.mkdir()
    write_table([sample(0, 1, solid((0, 0, 255))), sample(0, 0, solid((255, 0, 0))),  # the chosen image first
                 sample(1, 1, None, STATUS_FAILED)], shard_path(samples, 0))
    write_table([sample(3, 1, solid((0, 255, 0))), sample(4, 1, b"not a png"), sample(5, 1, solid((1, 2, 3)))],
                shard_path(samples, 1))
    write_table([detection(0, 1, [0.9, 0.0, 0.5, 0.0, 0.0]), detection(0, 0, [0.9] * 5),
                 detection(1, 1, [], STATUS_NO_IMAGE), detection(5, 1, [], "detect_failed")], shard_path(detections, 0))
    prompts = PROMPTS + [MultiGenPrompt(5, "prompt 5", tuple(OBJECTS))]
    cells = grid_cells(samples, detections, prompts, image_index=1, size=16, rule=multigen_rule(0.1))
    assert [c.caption for c in cells] == ["2/5 found; missed: dog, kite, boat", f"no image: {STATUS_FAILED}",
                                          "not sampled", "not detected",
                                          "image does not decode: UnidentifiedImageError",
                                          "detection: detect_failed"]
    assert cells[0].image.shape == (16, 16, 3) and (cells[0].image == [0, 0, 255]).all()
    assert (cells[3].image == [0, 255, 0]).all()
    assert [c.image is None for c in cells] == [False, True, True, False, True, False]


def test_only_shards_holding_a_wanted_row_are_read_whole(tmp_path, monkeypatch):
    """Shards in a seeded prompt order (VISOR's) hold wanted ids anywhere: the image column is read only from
    shards with a wanted row, and reading stops once every row is found."""
    import pipeline.sample_grid as grid

    samples = tmp_path / "samples"
    samples.mkdir()
    order = [4, 0, 3, 1, 2]  # prompt ids in shard order, one prompt (two images) per shard
    for i, pid in enumerate(order):
        write_table([sample(pid, 0, solid((pid, 0, 0))), sample(pid, 1, solid((pid, 1, 0)))], shard_path(samples, i))
    reads = []
    real = grid.read_table
    monkeypatch.setattr(grid, "read_table", lambda f, columns, filters: reads.append((f.name, tuple(columns))) or
                        real(f, columns, filters))
    rows = grid._rows_by_prompt(samples, ["prompt_id", "image", "status"], [0, 1], image_index=1)
    assert sorted(rows) == [0, 1] and (rows[1]["image"] == solid((1, 1, 0)))
    whole = [name for name, columns in reads if "image" in columns]
    assert whole == [shard_path(samples, 1).name, shard_path(samples, 3).name]  # prompts 0 and 1
    assert len(reads) == 6  # keys of shards 0-3, images of shards 1 and 3; shard 4 is never opened


def test_spatial_cells_read_the_box_columns(tmp_path):
    """The VISOR rule reads boxes and centres from detection rows as the visor stage writes them."""
    prompt = SpatialPrompt(3, "a cat above a dog", ("cat", "dog"), relation="above")
    samples, detections = tmp_path / "samples", tmp_path / "detections"
    samples.mkdir(), detections.mkdir()
    write_table([sample(3, 0, solid((9, 9, 9)))], shard_path(samples, 0))
    write_table([{"prompt_id": 3, "image_index": 0, "objects": ["cat", "dog"], "box_scores": [0.6, 0.7],
                  "box_labels": [0, 1], "box_centers": [[5.0, 10.0], [5.0, 90.0]], "label_max_scores": [0.6, 0.7],
                  "status": STATUS_OK, "error": ""}], shard_path(detections, 0))
    (cell,) = grid_cells(samples, detections, [prompt], 0, 8, spatial_rule(0.1))
    assert cell.caption == "both found; relation holds" and cell.image.shape == (8, 8, 3)


def test_cells_name_the_stage_to_run_when_a_model_was_not_sampled(tmp_path):
    missing = "artifacts/samples/sd14/coco: shard directory not found; run `dvc repro sample`"
    with pytest.raises(FileNotFoundError, match=missing):
        grid_cells(tmp_path / "artifacts/samples/sd14/coco", tmp_path / "d", PROMPTS, 0, 16, multigen_rule(0.1))


def test_grid_models_default_to_every_evaluated_model_and_reject_unknown_ones():
    models = {"sd14": {}, "trained": {}, "attend_excite": {}}
    assert grid_models(SampleGridCfg(), models) == ["sd14", "trained", "attend_excite"]
    assert grid_models(SampleGridCfg(models=("trained", "sd14")), models) == ["trained", "sd14"]
    with pytest.raises(ValueError, match=r"sample_grid.models: \['sd15'\] are not keys of eval_models"):
        grid_models(SampleGridCfg(models=("sd15",)), models)
    with pytest.raises(ValueError, match=r"sample_grid.models: empty"):
        grid_models(SampleGridCfg(models=()), models)
    with pytest.raises(ValueError, match=r"sample_grid.models: \['sd14'\] listed more than once"):
        grid_models(SampleGridCfg(models=("sd14", "trained", "sd14")), models)


def test_figure_has_a_cell_per_model_and_prompt(tmp_path):
    """The figure grows with rows and columns; a cell without image is allowed; mismatched inputs are errors."""
    from pipeline.sample_grid import GridCell

    red = np.full((32, 32, 3), (255, 0, 0), np.uint8)

    def size(rows: int, cols: int) -> tuple[int, int]:
        cells = {f"model{r}": [GridCell(red if c else None, "1/5 found") for c in range(cols)] for r in range(rows)}
        return Image.open(io.BytesIO(sample_grid_figure(cells, PROMPTS[:cols], "t"))).size

    (w1, h1), (w2, h2) = size(1, 2), size(3, 4)
    assert w2 > w1 and h2 > h1
    long = "0/5 found; missed: toilet, bench, coffee table, bicycle, bag"  # wraps to 3 lines at 32 px cells
    one = Image.open(io.BytesIO(image_grid([[red]], [["1/5 found"]], ["m"], ["p"]))).size
    three = Image.open(io.BytesIO(image_grid([[red]], [[long]], ["m"], ["p"]))).size
    assert three[1] - one[1] >= 2 * 0.13 * 100 - 2  # a row grows by a line height per extra caption line
    with pytest.raises(ValueError, match="2 rows of 1 cells"):
        image_grid([[red]], [["a"]], ["m1", "m2"], ["p"])
    with pytest.raises(ValueError, match="one size"):
        image_grid([[red, red[:16]]], [["a", "b"]], ["m"], ["p", "q"])


def test_grouped_bars_accept_missing_values_and_reject_wrong_lengths():
    png = grouped_bars({"A": {"run": ([50.0, float("nan")], [1.0, float("nan")])},
                        "B": {"run": ([10.0, 20.0], [0.0, 0.0]), "paper": ([30.0, 40.0], [1.0, 1.0]),
                              "empty": ([float("nan")] * 2, [float("nan")] * 2)}},
                       ["MG2", "MG3"], hatched={"paper"})
    assert Image.open(io.BytesIO(png)).format == "PNG"
    with pytest.raises(ValueError, match="A / run: 1 means and 1 stds for 2 categories"):
        grouped_bars({"A": {"run": ([50.0], [1.0])}}, ["MG2", "MG3"])

"""Config parsing: unknown, missing, mistyped and out-of-range keys are errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest
import yaml

from pipeline.config import Bounds, ConfigError, Fraction, NonEmpty, Pixels, PositiveInt, load_params, parse, section


@dataclass(frozen=True)
class Inner:
    lr: float
    steps: int = 10


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner
    layers: list[str]
    mode: Literal["a", "b"] = "a"
    ref: Optional[str] = None
    path: Path = Path("x")
    weights: dict[str, float] = field(default_factory=dict)


def test_parse_valid_nested_and_defaults():
    cfg = parse(Outer, {"name": "n", "inner": {"lr": 1}, "layers": ["up_64"], "weights": {"a": 2}}, "sec")
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.steps == 10 and cfg.mode == "a" and cfg.ref is None
    assert cfg.layers == ["up_64"] and cfg.weights == {"a": 2.0}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "n", "inner": {"lr": 1}, "layers": [], "typo": 1}, "sec.typo: unknown key"),
        ({"name": "n", "layers": []}, "sec.inner: missing key"),
        ({"name": "n", "inner": {"lr": "fast"}, "layers": []}, "sec.inner.lr: expected float"),
        ({"name": "n", "inner": {"lr": 1, "steps": 2.5}, "layers": []}, "sec.inner.steps: expected int"),
        ({"name": "n", "inner": {"lr": 1}, "layers": "up_64"}, "sec.layers: expected a list"),
        ({"name": "n", "inner": {"lr": 1}, "layers": [3]}, "sec.layers[0]: expected a string"),
        ({"name": "n", "inner": {"lr": 1}, "layers": [], "mode": "c"}, "sec.mode: expected one of"),
        ({"name": 5, "inner": {"lr": 1}, "layers": []}, "sec.name: expected a string"),
        ({"name": "n", "inner": {"lr": True}, "layers": []}, "sec.inner.lr: expected float"),
    ],
)
def test_parse_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(Outer, data, "sec")


def test_load_params_rejects_unknown_profile(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("profile: huge\nseed: 0\nprofiles:\n  demo: {}\n")
    with pytest.raises(ConfigError, match="profile: 'huge' is not one of"):
        load_params(p)


def test_section_reads_active_profile(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("profile: paper\nseed: 0\nloss: {lr: 0.5}\nprofiles:\n  demo: {train: {lr: 1}}\n  paper: {train: {lr: 2}}\n")
    params = load_params(p)
    assert section(params, "profile.train", Inner).lr == 2.0
    assert section(params, "loss", Inner).lr == 0.5
    with pytest.raises(ConfigError, match="profiles.paper.nothing: missing section"):
        section(params, "profile.nothing", Inner)


def test_repository_params_profiles_define_the_same_sections():
    """Both profiles define every scale-bound section, so switching profile never hits a missing key."""
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    demo, paper = params["profiles"]["demo"], params["profiles"]["paper"]
    assert params["profile"] == "demo"
    assert set(demo) == set(paper), set(demo) ^ set(paper)


REPO = Path(__file__).resolve().parents[1]


def _declared():
    """(top-level, profile) keys that the repository's dvc.yaml reads."""
    from pipeline.params_check import declared_keys

    text = (REPO / "dvc.yaml").read_text()
    return declared_keys(yaml.safe_load(text), text)


def test_every_repository_params_key_is_read_by_a_stage():
    """params.yaml holds no key that no stage reads (each would be a silently ignored setting), and every key
    a stage declares exists in it."""
    from pipeline.params_check import unknown_keys

    params = load_params(REPO / "params.yaml")
    top, profile = _declared()
    assert unknown_keys(params, top, profile) == []
    assert top == set(params) and profile == set(params["profiles"]["demo"])


@pytest.mark.parametrize("edit,message", [
    (lambda p: p.update(los={"token_weight": 1.0}), r"params.yaml: los: no stage reads this key \(dvc.yaml\); did you mean 'loss'\?"),
    (lambda p: p["profiles"]["demo"].update(resolutoin=64), r"profiles.demo.resolutoin: no stage reads this key \(dvc.yaml\); did you mean 'resolution'\?"),
])
def test_misspelled_sections_are_errors(tmp_path, monkeypatch, edit, message):
    """The check_params stage, run as `dvc repro` runs it, fails on a key no stage reads, naming the closest one."""
    import runpy

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        runpy.run_path(str(REPO / "stages" / "check_params.py"), run_name="__main__")
    assert not (tmp_path / "metrics").exists()


def test_params_check_stage_depends_on_the_whole_params_file():
    """A new misspelt key changes no stage's declared params, so only a stage with params.yaml itself as a
    dependency reruns on it: check_params."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["check_params"]
    assert "params.yaml" in stage["deps"]


@pytest.mark.parametrize("text,value", [
    ("1e-05", 1e-05), ("3e-6", 3e-06), ("5.0e-5", 5e-05), ("1E5", 1e5), ("-2.5", -2.5), (".5", 0.5),
    ("10", 10), ("1_000", 1000), ("0x10", 16), ("true", True), ("yes", "yes"), ("off", "off"), ("'1e-5'", "1e-5"),
])
def test_params_are_read_as_yaml_1_2(tmp_path, text, value):
    """Numbers as DVC writes them (`dvc exp run -S optim.lr=1e-05` writes YAML 1.2) are floats; YAML 1.1's
    other booleans stay strings, as DVC reads them."""
    path = tmp_path / "params.yaml"
    path.write_text(f"profile: demo\nseed: 0\nx: {text}\nprofiles:\n  demo: {{}}\n")
    got = load_params(path)["x"]
    assert got == value and type(got) is type(value)


def test_exponent_floats_pass_float_params(tmp_path):
    """A float param written without a dot (DVC's `1e-05`) passes a float field."""
    path = tmp_path / "params.yaml"
    path.write_text("profile: demo\nseed: 0\nloss: {lr: 1e-05}\nprofiles:\n  demo: {}\n")
    assert section(load_params(path), "loss", Inner).lr == 1e-05


def test_malformed_yaml_is_one_line_naming_the_place(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("profile: demo\nseed: 0\nloss: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"params.yaml: not valid YAML \(.* at line \d+, column \d+\)"):
        load_params(path)


def test_unknown_model_name_lists_the_known_ones():
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    from pipeline.eval_models import EvalModel

    with pytest.raises(ConfigError, match=r"eval_models.sd41: missing section; .*\(known: sd14, "):
        section(params, "eval_models.sd41", EvalModel)


def _all_sections():
    """(dotted section, dataclass) of every params section a stage parses."""
    from pipeline.attention_maps.figures import AttentionMapsCfg, AttentionMapsScale
    from pipeline.attention_maps.grounding_eval import GroundingEvalCfg, GroundingEvalScale
    from pipeline.datasets.demo_scale import DemoDataScale
    from pipeline.datasets.multigen_source import PromptsScale
    from pipeline.datasets.piebench_files import EditDataScale
    from pipeline.editing import EditingCfg, EditingScale
    from pipeline.eval_models import EvalModel, EvalModelRef
    from pipeline.masks.params import GroundingCfg, MasksScale
    from pipeline.multigen.settings import MultiGenCfg, MultiGenScale
    from pipeline.piebench import PieBenchCfg, PieBenchScale
    from pipeline.sample_grid import SampleGridCfg
    from pipeline.sampling.settings import SamplingCfg, SamplingScale
    from pipeline.text.nouns_rows import TextCfg, TextScale
    from pipeline.training.losses import LossCfg
    from pipeline.training.settings import OptimCfg, TrainCfg, TrainScale

    fixed = [
        ("text", TextCfg), ("profile.text", TextScale), ("profile.demo_data", DemoDataScale),
        ("profile.prompts", PromptsScale), ("profile.edit_data", EditDataScale), ("grounding", GroundingCfg),
        ("profile.masks", MasksScale), ("loss", LossCfg), ("optim", OptimCfg), ("train", TrainCfg),
        ("profile.train", TrainScale), ("sampling", SamplingCfg), ("profile.sampling", SamplingScale),
        ("multigen", MultiGenCfg), ("profile.multigen", MultiGenScale), ("editing", EditingCfg),
        ("profile.editing", EditingScale), ("piebench", PieBenchCfg), ("profile.piebench", PieBenchScale),
        ("attention_maps", AttentionMapsCfg), ("profile.attention_maps", AttentionMapsScale),
        ("grounding_eval", GroundingEvalCfg), ("profile.grounding_eval", GroundingEvalScale),
        ("sample_grid", SampleGridCfg),
    ]
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    per_model = [(f"eval_models.{k}", EvalModel) for k in params["eval_models"]]
    per_model += [(f"profile.eval_models.{k}", EvalModelRef) for k in params["eval_models"]]
    return fixed + per_model


@pytest.mark.parametrize("profile", ["demo", "paper"])
def test_every_stage_section_parses_in_both_profiles(profile):
    """A typo or a missing key in the paper profile fails here, not hours into a GPU run."""
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    params["profile"] = profile
    for dotted, cls in _all_sections():
        section(params, dotted, cls)


@pytest.mark.parametrize("key,value", [("loss.pixel_weight", 5e-05), ("optim.lr", 1e-05), ("optim.eps", 3e-06),
                                       ("loss.token_weight", 0.002)])
def test_params_survive_dvc_set_rewrites(tmp_path, key, value):
    """`dvc exp run -S k=v` rewrites params.yaml with ruamel.yaml (YAML 1.2, which writes 1e-05 without a
    dot); the result must still parse, with the value a float in every section that reads it."""
    import io

    from ruamel.yaml import YAML

    path = Path(__file__).resolve().parents[1] / "params.yaml"
    rt = YAML()
    data = rt.load(path.read_text())
    section_name, name = key.split(".")
    data[section_name][name] = value  # what `-S loss.pixel_weight=5e-05` does
    buf = io.StringIO()
    rt.dump(data, buf)
    (tmp_path / "params.yaml").write_text(buf.getvalue())
    rewritten = load_params(tmp_path / "params.yaml")
    assert rewritten[section_name][name] == value and isinstance(rewritten[section_name][name], float)
    for profile in ("demo", "paper"):
        rewritten["profile"] = profile
        for dotted, cls in _all_sections():
            section(rewritten, dotted, cls)


@dataclass(frozen=True)
class Bounded:
    steps: PositiveInt = 1
    rate: Fraction = 0.5
    size: Pixels = 64
    limit: PositiveInt | None = None
    names: Annotated[list[str], NonEmpty()] = field(default_factory=lambda: ["a"])
    below_one: Annotated[float, Bounds(low=0, high=1, open_high=True)] = 0.0


@pytest.mark.parametrize("data,message", [
    ({"steps": 0}, r"sec.steps: 0 is out of range; expected >= 1"),
    ({"steps": -5}, r"sec.steps: -5 is out of range"),
    ({"rate": 1.5}, r"sec.rate: 1.5 is out of range; expected >= 0 and <= 1"),
    ({"rate": float("nan")}, r"sec.rate: nan is out of range"),
    ({"size": 100}, r"sec.size: 100 is not a multiple of 8"),
    ({"limit": -1}, r"sec.limit: -1 is out of range; expected >= 1"),
    ({"names": []}, r"sec.names: empty; give at least one entry"),
    ({"below_one": 1.0}, r"sec.below_one: 1.0 is out of range; expected >= 0 and < 1"),
    ({"steps": "3"}, r"sec.steps: expected int, got str"),
])
def test_out_of_range_values_are_errors_naming_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        parse(Bounded, data, "sec")


def test_values_at_the_bounds_are_accepted():
    got = parse(Bounded, {"steps": 1, "rate": 1, "size": 8, "limit": None, "names": ["x"], "below_one": 0.99}, "s")
    assert (got.steps, got.rate, got.size, got.limit, got.below_one) == (1, 1.0, 8, None, 0.99)


@pytest.mark.parametrize("dotted,key,value,message", [
    ("profile.train", "batch_size", 0, r"profiles.demo.train.batch_size: 0 is out of range"),
    ("profile.train", "max_steps", -5, r"profiles.demo.train.max_steps: -5 is out of range"),
    ("profile.train", "checkpoint_every", 0, r"checkpoint_every: 0 is out of range"),
    ("profile.sampling", "max_prompts", -1, r"profiles.demo.sampling.max_prompts: -1 is out of range"),
    ("profile.sampling", "resolution", 100, r"resolution: 100 is not a multiple of 8"),
    ("profile.editing", "num_inference_steps", -5, r"profiles.demo.editing.num_inference_steps: -5 is out of range"),
    ("profile.multigen", "dtype", "fp16", r"profiles.demo.multigen.dtype: expected one of \['auto', 'float32'"),
    ("grounding", "box_threshold", 2.0, r"grounding.box_threshold: 2.0 is out of range"),
    ("multigen", "threshold", 1.0, r"multigen.threshold: 1.0 is out of range; expected >= 0 and < 1"),
    ("multigen", "query_template", "a photo of a {object}", r"multigen: query_template .* must hold the object name"),
    ("editing", "mask_threshold", 2.0, r"editing.mask_threshold: 2.0 is out of range"),
    ("editing", "init", "zero", r"editing.init: expected one of"),
    ("loss", "layers", [], r"loss: layers is empty but a grounding weight is not 0"),
    ("grounding_eval", "groups", [], r"grounding_eval.groups: empty"),
    ("loss", "layers", ["mid_8", "foo_8"], r"loss: unknown cross-attention group name\(s\) \['foo_8'\]"),
    ("grounding_eval", "groups", ["up64"], r"grounding_eval: unknown cross-attention group name\(s\) \['up64'\]"),
    ("attention_maps", "groups", ["up_64", 8], r"attention_maps.groups\[1\]: expected a string"),
    ("attention_maps", "groups", ["foo_8"], r"attention_maps: unknown cross-attention group name"),
    ("sampling", "scheduler", "FooScheduler", r"sampling: scheduler: 'FooScheduler' is not a diffusers scheduler"),
    ("profile.piebench", "clip_model", "bogus", r"profiles.demo.piebench: clip_model 'bogus': expected ARCH:TAG"),
    ("text", "max_token_index", 76, r"text.max_token_index: 76 is out of range; expected >= 1 and <= 75"),
    ("profile.data", "heldout_fraction", 1.0, r"profiles.demo.data.heldout_fraction: 1.0 is out of range"),
    ("sampling", "attend_excite", {"thresholds": {"ten": 0.5}}, r"thresholds: keys are denoising step indices"),
    ("sampling", "attend_excite", {"thresholds": {0: 1.5}}, r"sampling.attend_excite.thresholds.0: 1.5 is out of"),
    ("sampling", "attend_excite", {"attn_res": [16]}, r"attn_res: give \(height, width\)"),
    ("report", "decimals", -1, r"report.decimals: -1 is out of range"),
    ("sample_grid", "num_prompts", 0, r"sample_grid.num_prompts: 0 is out of range"),
    ("sample_grid", "cell_size", 8, r"sample_grid.cell_size: 8 is out of range"),
])
def test_repository_sections_reject_values_that_would_fail_late_or_silently(dotted, key, value, message):
    """Each of these used to crash deep inside a stage, after deleting finished work, or to run and write
    meaningless numbers."""
    from pipeline.attention_maps.figures import AttentionMapsCfg
    from pipeline.attention_maps.grounding_eval import GroundingEvalCfg
    from pipeline.editing import EditingCfg, EditingScale
    from pipeline.masks.params import GroundingCfg
    from pipeline.multigen.settings import MultiGenCfg, MultiGenScale
    from pipeline.piebench import PieBenchScale
    from pipeline.sample_grid import SampleGridCfg
    from pipeline.sampling.settings import SamplingCfg, SamplingScale
    from pipeline.text.nouns_rows import TextCfg
    from pipeline.training.losses import LossCfg
    from pipeline.training.settings import TrainScale
    from stages.report import ReportCfg
    from stages.train_data import TrainDataScale

    classes = {"sampling": SamplingCfg, "report": ReportCfg, "profile.train": TrainScale, "profile.sampling": SamplingScale, "profile.editing": EditingScale,
               "profile.multigen": MultiGenScale, "grounding": GroundingCfg, "multigen": MultiGenCfg,
               "editing": EditingCfg, "loss": LossCfg, "grounding_eval": GroundingEvalCfg,
               "sample_grid": SampleGridCfg, "attention_maps": AttentionMapsCfg,
               "profile.piebench": PieBenchScale, "text": TextCfg, "profile.data": TrainDataScale}
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    node = params["profiles"]["demo"] if dotted.startswith("profile.") else params
    node[dotted.split(".")[-1]][key] = value
    with pytest.raises(ConfigError, match=message):
        section(params, dotted, classes[dotted])


def test_plain_fine_tuning_may_have_no_layers():
    from pipeline.training.losses import LossCfg

    assert parse(LossCfg, {"token_weight": 0, "pixel_weight": 0, "layers": []}, "loss").layers == []


@pytest.mark.parametrize("seed", [1.5, "abc", -1, True, None])
def test_seed_must_be_a_non_negative_integer(tmp_path, seed):
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["seed"] = seed
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"seed: expected a non-negative integer"):
        load_params(path)


def test_checkpoint_limit_zero_keeps_every_checkpoint():
    from pipeline.training.settings import TrainCfg

    assert parse(TrainCfg, {"checkpoint_limit": 0}, "train").checkpoint_limit == 0

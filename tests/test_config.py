"""Config parsing: unknown, missing and mistyped keys are errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from pipeline.config import ConfigError, load_params, parse, section


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
    p.write_text("profile: huge\nprofiles:\n  demo: {}\n")
    with pytest.raises(ConfigError, match="profile: 'huge' is not one of"):
        load_params(p)


def test_section_reads_active_profile(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("profile: paper\nloss: {lr: 0.5}\nprofiles:\n  demo: {train: {lr: 1}}\n  paper: {train: {lr: 2}}\n")
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

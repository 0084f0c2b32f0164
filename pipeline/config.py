"""Turn sections of ``params.yaml`` into frozen, type-checked dataclasses.

``params.yaml`` has two kinds of values (DESIGN §2):

* method hyperparameters at the top level (``loss``, ``optim``, ``grounding``, ...), identical in every
  profile, so ``dvc exp run -S loss.pixel_weight=1e-4`` means the same thing everywhere;
* scale-bound values under ``profiles.<name>`` (model references, sizes, step counts), selected by the
  top-level ``profile`` key.

Each module of the library owns the dataclass of the section it reads and calls :func:`parse` on it.
Unknown keys, missing keys and wrong types raise :class:`ConfigError` naming the full key path
(``profiles.demo.train.max_steps: expected int, got str '30'``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_PARAMS = Path("params.yaml")


class StageError(Exception):
    """An error whose message names the input and the fix: a stage prints it as one line, without a traceback
    (:func:`pipeline.runtime.run_stage`; ``TOKENCOMPOSE_TRACEBACK=1`` shows the traceback)."""


class ConfigError(StageError, ValueError):
    """A params section does not match its dataclass; the message names the key and the fix."""


class MissingInputError(StageError, FileNotFoundError):
    """A stage's input file or folder is missing; the message names it and the stage or param that gives it."""


class InputDataError(StageError, ValueError):
    """A stage's inputs cannot give a valid result (stale or mismatched upstream outputs); the message says
    which stage to rerun or which param to change."""


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The range a number in params.yaml must lie in, checked by :func:`parse`.

    Attach it to a field type: ``batch_size: Annotated[int, Bounds(low=1)]`` (or one of the aliases
    below); ``open_low`` / ``open_high`` exclude the end points, ``multiple_of`` asks for a multiple.
    """

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    multiple_of: int | None = None

    def check(self, value: float, where: str) -> None:
        """Raise :class:`ConfigError` naming ``where`` when ``value`` is outside the range."""
        low_ok = self.low is None or (value > self.low if self.open_low else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.open_high else value <= self.high)
        finite = math.isfinite(value)
        if not (low_ok and high_ok and finite):
            raise ConfigError(f"{where}: {value!r} is out of range; expected {self.describe()}")
        if self.multiple_of and value % self.multiple_of:
            raise ConfigError(f"{where}: {value!r} is not a multiple of {self.multiple_of}")

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.open_low else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.open_high else '<='} {self.high:g}")
        return " and ".join(parts) or "a finite number"


@dataclasses.dataclass(frozen=True)
class NonEmpty:
    """A list in params.yaml that must have at least one entry, checked by :func:`parse`."""


# Field types with bounds, for the dataclasses that read params sections.
PositiveInt = Annotated[int, Bounds(low=1)]
NonNegativeInt = Annotated[int, Bounds(low=0)]
NonNegativeFloat = Annotated[float, Bounds(low=0)]
PositiveFloat = Annotated[float, Bounds(low=0, open_low=True)]
Fraction = Annotated[float, Bounds(low=0, high=1)]  # a share, rate, probability or threshold in [0, 1]
FractionBelowOne = Annotated[float, Bounds(low=0, high=1, open_high=True)]  # [0, 1): a threshold or beta
DtypeName = Literal["auto", "float32", "float16", "bfloat16"]  # inference dtype; auto: float16 on CUDA, else float32
Pixels = Annotated[int, Bounds(low=8, multiple_of=8)]  # an image side the VAE divides by 8


class ParamsLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads numbers as YAML 1.2 does, as DVC writes them: ``1e-05``, ``3e-6`` and
    ``1E5`` are floats (YAML 1.1, PyYAML's default, reads a float without a dot as a string); ``yes``,
    ``no``, ``on`` and ``off`` stay strings (YAML 1.2 booleans are ``true`` and ``false`` only)."""


ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line of a YAML error: its problem and where."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or type(err).__name__}{where}"


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read ``params.yaml`` as YAML 1.2 (:class:`ParamsLoader`) and check the profile switch.

    Raises :class:`ConfigError` when the file is missing, is not a mapping, names a profile that
    ``profiles`` does not define, or its ``seed`` is not a non-negative integer (every stage derives its
    seeds from it). Keys no stage reads are found by the ``params`` stage (:mod:`stages.params`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; run from the repository root")
    with path.open() as f:
        try:
            params = yaml.load(f, Loader=ParamsLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)}); fix the file (or "
                              f"`git checkout -- {path}`)") from err
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    profile = params.get("profile")
    profiles = params.get("profiles")
    if not isinstance(profiles, dict) or not profiles:
        raise ConfigError(f"{path}: missing 'profiles' mapping")
    if profile not in profiles:
        raise ConfigError(
            f"{path}: profile: {profile!r} is not one of {sorted(profiles)}; "
            f"set 'profile' to one of them (e.g. dvc exp run -S profile=paper)"
        )
    seed = params.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{path}: seed: expected a non-negative integer, got {seed!r}")
    for name, prof in profiles.items():
        if not isinstance(prof, dict):
            raise ConfigError(f"{path}: profiles.{name} must be a mapping")
    return params


def active_profile(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``profiles.<profile>`` mapping of the selected profile."""
    return params["profiles"][params["profile"]]


def section(params: Mapping[str, Any], dotted: str, cls: type[T]) -> T:
    """Parse the section at ``dotted`` (``"loss"``, ``"profile.train"``) into ``cls``.

    A leading ``profile.`` segment selects the active profile's mapping, so stages do not need to know
    which profile is on: ``section(p, "profile.train", TrainScale)`` reads ``profiles.<active>.train``.
    """
    parts = dotted.split(".")
    if parts[0] == "profile":
        node: Any = active_profile(params)
        where = f"profiles.{params['profile']}"
        parts = parts[1:]
    else:
        node, where = params, ""
    for part in parts:
        where = f"{where}.{part}" if where else part
        if not isinstance(node, Mapping) or part not in node:
            known = f" (known: {', '.join(map(str, node))})" if isinstance(node, Mapping) and node else ""
            raise ConfigError(f"{where}: missing section; add it to params.yaml{known}")
        node = node[part]
    return parse(cls, node, where)


def profile_fields(params: Mapping[str, Any], cls: type[T]) -> T:
    """Parse the top-level keys of the active profile that ``cls`` declares (``models_dir``, ``sd_model``...).

    Other keys of the profile (its sections) are ignored; a missing or mistyped key is a ConfigError.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    prof = active_profile(params)
    return parse(cls, {k: v for k, v in prof.items() if k in names}, f"profiles.{params['profile']}")


def parse(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and types recursively.

    Supported field types: ``bool``, ``int``, ``float`` (ints are accepted), ``str``, ``Path``,
    ``Optional[X]``, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, ``Literal[...]``,
    nested dataclasses, and ``Annotated[X, Bounds(...) | NonEmpty()]`` (range and non-empty checks).
    Fields with defaults may be omitted; every other missing key is an error. A ``ValueError`` raised by
    the dataclass's own ``__post_init__`` checks becomes a :class:`ConfigError` naming the section.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown key (known keys: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, field in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            has_default = (
                field.default is not dataclasses.MISSING
                or field.default_factory is not dataclasses.MISSING
            )
            if has_default:
                continue
            raise ConfigError(f"{key}: missing key; add it to params.yaml")
        kwargs[name] = _coerce(hints[name], data[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from err


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` and convert containers to their frozen form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        value = _coerce(args[0], value, where)
        for rule in tp.__metadata__:
            if isinstance(rule, Bounds):
                rule.check(value, where)
            elif isinstance(rule, NonEmpty) and not value:
                raise ConfigError(f"{where}: empty; give at least one entry")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = tuple(_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
        return items if origin is tuple else list(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        val_tp = args[1] if args else Any
        return {str(k): _coerce(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a path string, got {type(value).__name__} {value!r}")
        return Path(value)
    raise TypeError(f"{where}: unsupported field type {tp!r}")

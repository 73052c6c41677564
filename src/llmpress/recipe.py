"""Recipes: which methods to apply, to which layers, with what calibration data.

A recipe is frozen dataclasses that map one to one onto YAML::

    calibration: {data: "austen:calib", samples: 128, seq_len: 512, seed: 0}
    stages:
      - {method: magnitude, args: {sparsity: 0.5}}
      - {method: rtn, ignore: ["*.down_proj"], args: {bits: 4, group_size: 64}}

Unknown keys are rejected with the list of valid ones. ``targets`` and
``ignore`` are fnmatch patterns on full module names (e.g.
``model.layers.0.mlp.down_proj``, ``*.self_attn.*``); only the linear
layers inside decoder blocks are compressed, so lm_head and the embeddings
are never touched by these methods.

A weight method's stage may give some layers settings of their own (mixed
precision; ``llmpress auto`` writes these)::

      - method: gptq
        args: {bits: 4, group_size: 64}
        overrides:
          - {targets: ["*.self_attn.v_proj"], args: {bits: 8}}
          - {targets: ["model.layers.3.mlp.down_proj"], args: {bits: 3, group_size: 32}}

An override's ``args`` are merged onto the stage's; the first override whose
``targets`` match a layer wins. The engine collects the stage's statistics
once for all its layers, so a mixed stage costs one calibration pass.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml

from .config import Check, Config, PositiveInt
from .data.sources import parse_spec
from .errors import LlmpressError, first_line
from .recipe_names import MAX_NESTING, compose
from .registry import WEIGHT_KINDS, builtin_recipes, get_method

CALIBRATION_DTYPES = ("float32", "bfloat16", "auto")


@dataclass(frozen=True)
class CalibrationConfig(Config):
    label = "calibration"

    data: Annotated[str, Check(advice="name a text, e.g. austen:calib")] = "austen:calib"
    samples: PositiveInt = 128
    seq_len: PositiveInt = 512
    seed: Annotated[int, Check(ge=-2**63, lt=2**64, advice="use an integer from 0 to 2**63")] = 0
    batch_size: PositiveInt = 8
    dtype: Annotated[str, Check(choices=CALIBRATION_DTYPES)] = "float32"  # calibration forward passes

    def check(self) -> None:
        parse_spec(self.data)  # a malformed spec fails when the recipe is read, used or not


@dataclass(frozen=True)
class Stage:
    method: str
    config: Any
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    overrides: tuple[tuple[tuple[str, ...], Any], ...] = ()  # (patterns, config) per override, first match wins

    def applies_to(self, name: str) -> bool:
        if self.targets and not any(fnmatch.fnmatchcase(name, p) for p in self.targets):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.ignore)

    def config_for(self, name: str) -> Any:
        """The config the layer ``name`` gets: that of the first override matching it, else the stage's."""
        for patterns, config in self.overrides:
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                return config
        return self.config

    def to_dict(self) -> dict:
        out: dict = {"method": self.method, "args": dataclasses.asdict(self.config)}
        if self.targets:
            out["targets"] = list(self.targets)
        if self.ignore:
            out["ignore"] = list(self.ignore)
        if self.overrides:
            base = out["args"]
            out["overrides"] = [{"targets": list(patterns),
                                 "args": {k: v for k, v in dataclasses.asdict(config).items() if base.get(k) != v}}
                                for patterns, config in self.overrides]
        return out


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    name: str | None = None

    @property
    def needs_calibration(self) -> bool:
        return any(get_method(s.method).needs_inputs for s in self.stages)

    def to_dict(self) -> dict:
        return {"name": self.name, "calibration": dataclasses.asdict(self.calibration),
                "stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, data: Any, name: str | None = None) -> Recipe:
        where = f"recipe {name}" if name else "recipe"
        data = _mapping(data, where, {"name", "calibration", "stages"})
        stages = data.get("stages")
        if not isinstance(stages, list) or not stages:
            raise LlmpressError(f"{where} needs a non-empty list 'stages', "
                                "e.g. stages: [{method: rtn, args: {bits: 4}}]")
        calib = _build(CalibrationConfig, data.get("calibration") or {}, f"{where}: calibration")
        built = tuple(_stage(s, f"{where}: stage {i + 1}") for i, s in enumerate(stages))
        if not isinstance(data.get("name", name), (str, type(None))):
            raise LlmpressError(f"{where}: name must be text, got {type(data['name']).__name__}")
        return cls(stages=built, calibration=calib, name=data.get("name", name))


def _mapping(data: Any, where: str, allowed: set[str]) -> dict:
    if not isinstance(data, dict):
        raise LlmpressError(f"{where} must be a mapping (key: value), got {type(data).__name__}")
    unknown = sorted(set(data) - allowed, key=str)
    if unknown:
        raise LlmpressError(f"{where}: unknown key '{unknown[0]}'; valid keys are {', '.join(sorted(allowed))}")
    return data


def _build(config_cls: type, args: Any, where: str) -> Any:
    names = {f.name for f in dataclasses.fields(config_cls)}
    args = _mapping(args, where, names)
    try:
        return config_cls(**args)
    except (TypeError, ValueError, ArithmeticError) as exc:  # a value of the wrong type for a check written by hand
        raise LlmpressError(f"{where}: {first_line(exc)}: check the values' types") from None


def _patterns(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LlmpressError(f"{where} must be a list of name patterns, e.g. ['*.mlp.*']")
    return tuple(value)


def _stage(data: Any, where: str) -> Stage:
    data = _mapping(data, where, {"method", "args", "targets", "ignore", "overrides"})
    if not isinstance(data.get("method"), str):
        raise LlmpressError(f"{where} has no 'method' name: name one, e.g. method: rtn")
    method = get_method(data["method"])
    args = data.get("args") or {}
    config = _build(method.config, args, f"{where} ({method.name}) args")
    return Stage(method.name, config,
                 _patterns(data.get("targets", []), f"{where} targets"),
                 _patterns(data.get("ignore", []), f"{where} ignore"),
                 _overrides(data.get("overrides"), method, args, f"{where} ({method.name}) overrides"))


def _overrides(data: Any, method, args: Any, where: str) -> tuple:
    """Per-layer settings of a weight method's stage: (patterns, config) pairs, each config the stage's
    args with the override's merged on top (and checked like them)."""
    if data is None:
        return ()
    if method.kind not in WEIGHT_KINDS:
        raise LlmpressError(f"{where}: only a per-layer method (quantize or prune) takes overrides; "
                            f"{method.name} is a {method.kind} method: remove 'overrides'")
    if not isinstance(data, list):
        raise LlmpressError(f"{where} must be a list, e.g. [{{targets: ['*.v_proj'], args: {{bits: 8}}}}]")
    out = []
    for i, item in enumerate(data):
        at = f"{where} {i + 1}"
        item = _mapping(item, at, {"targets", "args"})
        patterns = _patterns(item.get("targets"), f"{at} targets")
        if not patterns:
            raise LlmpressError(f"{at} has no targets: name the layers it sets, e.g. targets: ['*.v_proj']")
        extra = _mapping(item.get("args") or {}, f"{at} args", {f.name for f in dataclasses.fields(method.config)})
        out.append((patterns, _build(method.config, {**args, **extra}, f"{at} args")))
    return tuple(out)


def load_recipe(spec: str | Path | Recipe | dict) -> Recipe:
    """A Recipe from a built-in name, a YAML file path, a dict, or a Recipe."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, dict):
        return Recipe.from_dict(spec)
    text = str(spec)
    if text in builtin_recipes():
        return Recipe.from_dict(builtin_recipes()[text], name=text)
    data = None if _is_file_spec(text) else compose(text)
    if data is not None:  # "A+B": built-in recipes one after the other, e.g. sparsegpt-24+distill(kl, steps=200)
        calibration = next((d["calibration"] for d in data if "calibration" in d), {})
        return Recipe.from_dict({"calibration": calibration, "stages": [s for d in data for s in d["stages"]]},
                                name=text)
    path = Path(text).expanduser()
    if _is_file_spec(text):
        if not path.is_file():
            raise LlmpressError(f"recipe file {path} does not exist: check the path, or use a built-in recipe "
                                f"({', '.join(builtin_recipes())})")
        return Recipe.from_dict(_read_yaml(path), name=path.stem)
    raise LlmpressError(f"unknown recipe '{text}': give a YAML file, a built-in name ({', '.join(builtin_recipes())}) "
                        "or built-in names joined by '+'")


MAX_RECIPE_BYTES = 1_000_000  # a recipe is a few lines; anything this big is not one


def _is_file_spec(text: str) -> bool:
    try:
        path = Path(text).expanduser()
        return path.suffix in (".yaml", ".yml", ".json") or path.exists()
    except (OSError, ValueError):  # a name too long or with a NUL byte for the file system: not a file
        return False


def _read_yaml(path: Path) -> Any:
    """The YAML document in ``path``, checked for size and nesting before it is built (PyYAML builds
    recursively: 5000 nested brackets overflow the stack, and a 10 MB file takes minutes)."""
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise LlmpressError(f"recipe {path} is {size:,} bytes, over the {MAX_RECIPE_BYTES:,}-byte limit: a recipe "
                                "is a few lines of YAML; check you named the right file")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LlmpressError(f"recipe {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except OSError as exc:
        raise LlmpressError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events only: flat, cheap, nothing built
            depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
            if depth > MAX_NESTING:
                raise LlmpressError(f"recipe {path} nests more than {MAX_NESTING} levels deep: a recipe needs "
                                    "three or four; check you named the right file")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise LlmpressError(f"recipe {path} is not valid YAML{at}: fix the syntax") from None

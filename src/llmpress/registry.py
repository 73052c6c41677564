"""Methods and built-in recipes, registered where they are defined; the calling convention of each kind.

A method module ends with one call::

    register(Method("rtn", RTNConfig, rtn, kind="quantize"),
             recipes={"rtn-w4-g64": {"stages": [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}]}})

and nothing else in llmpress names it: :func:`get_method` and :func:`builtin_recipes` first import
every module of the method packages (``quant``, ``prune``, ``lowrank``, ``distill``, ``rotate``, and
``llmpress.recipes`` for recipes that chain several methods), which registers them. So this module
imports no method, the engine and the API import only this module, and adding a method is one file.

The kinds and what the engine calls (``fn``):

- ``"quantize"`` / ``"prune"`` (weight methods, :class:`WeightMethod`): ``fn(weight, *stats, cfg) ->
  Compressed`` per linear, ``stats`` the entries of ``llmpress.stats.STATS`` named by ``Method.stats``,
  collected by the engine on the block's calibration inputs.
- ``"block"`` (:class:`BlockMethod`): ``fn(block, arch, modules, run, cfg) -> {name: meta}``; rewrites a
  whole block (smoothing: AWQ, SmoothQuant); ``run()`` passes the calibration inputs through it.
- ``"model"`` (:class:`ModelMethod`): ``fn(model, arch, samples, cfg, *, device, batch_size, progress,
  **inputs) -> {full layer name: meta}``; sees the whole model (depth/width pruning, low-rank with
  global rank allocation, distillation). ``Method.inputs`` names extra keyword inputs: "teacher" (a
  copy of the model before the first stage), "tokenizer", "layers" (per-layer meta so far),
  "results" (the engine's ``Compressed`` per layer, which the method may rewrite), "resume" (a
  ``llmpress.resume.Resume`` scoped to the stage: what it computed at its natural points, kept for the same
  command after a kill).
- ``"plan"`` (:class:`PlanMethod`): same arguments as a model method, returns a :class:`BlockPlan`
  (per block, which weight methods to run with which config) that the engine then executes (OWL).
- ``"runtime"``: changes inference, not weights (KV-cache quantization). ``Method.runtime`` is a
  :class:`RuntimeSetting`; ``fn`` is not called by the engine.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

from .compressed import Compressed
from .errors import LlmpressError

KINDS = ("quantize", "prune", "block", "model", "plan", "runtime")
WEIGHT_KINDS = ("quantize", "prune")
METHOD_PACKAGES = ("quant", "prune", "lowrank", "distill", "rotate")
INPUTS = ("teacher", "tokenizer", "layers", "results", "resume")


class WeightMethod(Protocol):
    def __call__(self, weight: Tensor, *stats: Tensor) -> Compressed: ...  # last positional: the config


class BlockMethod(Protocol):
    def __call__(self, block: nn.Module, arch: Any, modules: dict[str, nn.Module], run: Callable[[], list],
                 cfg: Any) -> dict[str, dict]: ...


class ModelMethod(Protocol):
    def __call__(self, model: nn.Module, arch: Any, samples: Tensor | None, cfg: Any, *, device: Any,
                 batch_size: int, progress: bool, **inputs: Any) -> dict[str, dict]: ...


@dataclass
class BlockPlan:
    """What a "plan" method hands the engine: ``steps[i]`` = the (method name, config) pairs to run on
    block i, in order; ``meta[i]`` is merged into the record of every layer of block i afterwards;
    ``prefix`` is put before each layer's method name (e.g. "owl-")."""

    steps: list[list[tuple[str, Any]]]
    meta: list[dict] = field(default_factory=list)
    prefix: str = ""


class PlanMethod(Protocol):
    def __call__(self, model: nn.Module, arch: Any, samples: Tensor | None, cfg: Any, *, device: Any,
                 batch_size: int, progress: bool) -> BlockPlan: ...


class RuntimeSetting(Protocol):
    """An inference-time setting stored in the recipe (KV-cache quantization)."""

    def coerce(self, value: Any) -> Any: ...  # a config from a config, a dict of its fields or a shorthand
    def from_meta(self, meta: dict | None) -> Any: ...  # the setting recorded in a folder's llmpress.json
    def cache_factory(self, model: nn.Module, cfg: Any) -> Callable | None: ...  # for the perplexity forward
    def report(self, cfg: Any, model_config: Any) -> dict: ...  # the setting and what it saves, for the report


@dataclass(frozen=True)
class Method:
    name: str
    config: type
    fn: Callable
    stats: tuple[str, ...] = ()
    kind: str = "quantize"  # one of KINDS, see the module docstring
    calibrated: bool | None = None  # whether it needs calibration data; None = decided by stats/kind
    inputs: tuple[str, ...] = ()  # extra keyword inputs of a "model" method (INPUTS)
    runtime: RuntimeSetting | None = None  # a "runtime" method's setting

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if set(self.inputs) - set(INPUTS):
            raise ValueError(f"method {self.name!r}: inputs {self.inputs} are not among {INPUTS}")
        if (self.kind == "runtime") != (self.runtime is not None):
            raise ValueError(f"method {self.name!r}: a runtime setting, and only that, is of kind 'runtime'")

    @property
    def needs_inputs(self) -> bool:
        """Whether the engine must run calibration data through the blocks for this method."""
        if self.calibrated is not None:
            return self.calibrated
        return bool(self.stats) or self.kind == "block"


METHODS: dict[str, Method] = {}
RECIPES: dict[str, dict] = {}
_discovered: list[bool] = []


def register(method: Method, recipes: dict[str, dict] | None = None) -> Method:
    """Add ``method`` (and its built-in recipes) to the tables; called at the end of the method's module."""
    old = METHODS.get(method.name)
    if old is not None and old.fn.__module__ != method.fn.__module__:
        raise ValueError(f"method {method.name!r} is registered by {old.fn.__module__} and {method.fn.__module__}")
    METHODS[method.name] = method
    register_recipes(recipes or {})
    return method


def register_recipes(recipes: dict[str, dict]) -> None:
    """Add built-in recipes (name -> the recipe as a dict, as in YAML)."""
    RECIPES.update(recipes)


def discover() -> None:
    """Import every module of the method packages (and ``llmpress.recipes``) once, so that they register."""
    if _discovered:
        return
    _discovered.append(True)
    for package in METHOD_PACKAGES:
        pkg = importlib.import_module(f"llmpress.{package}")
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            importlib.import_module(f"llmpress.{package}.{info.name}")
    importlib.import_module("llmpress.recipes")


def methods() -> dict[str, Method]:
    """Every registered method by name."""
    discover()
    return METHODS


def builtin_recipes() -> dict[str, dict]:
    """Every built-in recipe by name, in registration order."""
    discover()
    return RECIPES


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name lists the valid ones and the closest match."""
    table = methods()
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), table, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise LlmpressError(f"unknown method '{name}'{hint}: valid methods are {', '.join(sorted(table))}")

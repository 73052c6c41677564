"""``llmpress auto``: a mixed-precision recipe chosen under a size budget.

Three steps, each in its own module: the sensitivity of every candidate setting of every block linear
(``llmpress.sensitivity``: Fisher-weighted output error, from one backward pass and the Gram matrices
GPTQ collects anyway), the allocation of settings to layers under the budget (``llmpress.allocate``:
the Lagrangian solution of the multiple-choice knapsack, then a greedy fill), and the recipe that
carries the choice (one stage per method, with per-layer ``overrides``), which ``llmpress compress``
runs unchanged. Sizes are those ``eval`` reports (packed codes plus fp16 scales and zero points, the
rest at 16 bits), so a recipe for "60MB" saves a model of at most 60 MB by eval's count.

Budgets: ``3.5bpw`` (bits per weight over the block linears, scales included, as eval's
``linear_bits_per_weight``), ``60MB`` / ``0.06GB`` / ``60000000B`` (the whole model, with the
norms and any linear left dense at 16 bits; the input embedding, and the head when tied to it, takes
part as one more layer: the embedding quantizer at the same bits and groups, or dense, its cost the
Fisher-weighted error of its lookup and of the tied head, ``sensitivity.embedding_sensitivity``;
``embedding=False`` / ``--keep-embedding`` leave it at 16 bits), or ``ppl<=40``: the smallest recipe whose
*measured* perplexity on the evaluation windows is at most 40. For that one the prediction only
proposes: each round compresses the model and measures it, scales the predicted NLL increase by
measured / predicted, and proposes again (``rounds``, default 3); the smallest recipe that met the
target is returned.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .allocate import allocate, total
from .data import calibration_samples, describe_spec
from .errors import LlmpressError, first_line
from .measure.size import layer_bytes, size_report
from .models.archs import arch_for
from .models.loader import DEFAULT_MODEL
from .paths import write_text_atomic
from .recipe import CalibrationConfig, Recipe
from .registry import builtin_recipes
from .sensitivity import (
    Candidate,
    EmbeddingSensitivity,
    Sensitivity,
    candidate_grid,
    embedding_candidates,
    embedding_sensitivity,
    output_fisher,
    sensitivity,
)

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9}


@dataclass(frozen=True)
class Budget:
    kind: str  # "bpw": bits per block-linear weight; "bytes": the whole model
    value: float
    text: str


def parse_budget(text: str) -> Budget:
    """``3.5bpw``, ``60MB`` (also kB, GB, B; decimal units, as eval's "size MB") or ``ppl<=40``."""
    ppl = re.fullmatch(r"\s*ppl\s*<=\s*([0-9]*\.?[0-9]+)\s*", str(text), re.IGNORECASE)
    if ppl:
        if float(ppl.group(1)) <= 1:
            raise LlmpressError(f"budget {text}: a perplexity target must be above 1")
        return Budget("ppl", float(ppl.group(1)), text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(bpw|b|kb|mb|gb)\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise LlmpressError(f"budget '{text}' is not understood: give bits per weight (e.g. 3.5bpw), a size "
                            "(e.g. 60MB) or a perplexity target (e.g. ppl<=40)")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "bpw":
        if not 1 <= value <= 16:
            raise LlmpressError(f"budget {text}: bits per weight must be between 1 and 16")
        return Budget("bpw", value, text)
    return Budget("bytes", value * _UNITS[unit], text)


def method_defaults(name: str) -> tuple[dict, dict]:
    """(stage args, calibration) of the method's own 4-bit group-64 built-in recipe (GPTQ: act-order and
    true-sequential), without bits and group size, and that recipe's calibration with every field filled
    in (``CalibrationConfig``'s defaults where the recipe names none)."""
    recipe = builtin_recipes().get(f"{name}-w4-g64") or builtin_recipes().get(f"{name}-50") or {}
    stages = [s for s in recipe.get("stages", []) if s.get("method") == name]
    args = dict(stages[0].get("args", {})) if len(stages) == 1 else {}
    for key in ("bits", "group_size", "sparsity", "pattern"):
        args.pop(key, None)
    return args, dataclasses.asdict(CalibrationConfig(**(recipe.get("calibration") or {})))


@dataclass
class AutoResult:
    recipe: Recipe
    sensitivity: Sensitivity
    choice: list[int]
    report: dict
    embedding: EmbeddingSensitivity | None = None  # its row, when the embedding took part (byte budgets)
    embedding_choice: int = 0  # the index of its setting there (0: dense)


def auto(model=DEFAULT_MODEL, budget: str = "3.5bpw", *, methods: tuple[str, ...] = ("gptq",),
         bits: tuple[int, ...] = (2, 3, 4, 8), groups: tuple[int, ...] = (32, 64, 128),
         sparsities: tuple[str, ...] = ("0.5", "2:4"), dense: bool = True, tokenizer=None,
         data: str | None = None, samples: int | None = None, seq_len: int | None = None, seed: int | None = None,
         fisher_samples: int = 16, device: str = "cpu", progress: bool = False,
         table: str | Path | None = None, eval_data: str = "austen:eval", eval_seq_len: int = 1024,
         eval_windows: int | None = 16, rounds: int = 3, embedding: bool = True) -> AutoResult:
    """Measure every candidate's cost on every block linear of ``model`` and choose, per layer, the setting
    that minimises the predicted loss within ``budget``; returns the recipe (``.recipe``, for ``compress``)
    and a report of the choice. Calibration defaults to the first method's built-in recipe's.

    ``table``: a JSON file of the measured costs: read when it exists (when it was measured on the same
    model, calibration and candidates), else written, so that other budgets take seconds, not minutes.
    ``eval_*`` and ``rounds``: the windows and the number of compress-and-measure rounds of a ``ppl<=``
    budget. ``embedding``: under a byte budget the input embedding (tied with the head) takes part too, as
    one more layer whose candidates are the embedding quantizer's (``llmpress.quant.embedding``) at ``bits``
    and ``groups``, or dense; its cost is measured like the linears' (``sensitivity.embedding_sensitivity``)
    and saved in ``table`` beside theirs. Bits-per-weight and perplexity budgets leave it at 16 bits."""
    from .api import _loaded, check_seq_len, resolve_device

    target = parse_budget(budget)
    if target.kind == "ppl" and rounds < 1:
        raise LlmpressError(f"--rounds {rounds} must be at least 1: each round compresses and measures once")
    if not methods:
        raise LlmpressError("auto needs at least one method: pass --methods gptq (or rtn, hqq, sparsegpt, ...)")
    defaults = {m: method_defaults(m) for m in methods}
    calib = defaults[methods[0]][1]
    calib.update({k: v for k, v in {"data": data, "samples": samples, "seq_len": seq_len, "seed": seed}.items()
                  if v is not None})
    try:
        candidates = candidate_grid(list(methods), list(bits), list(groups), list(sparsities),
                                    {m: d[0] for m, d in defaults.items()}, dense)
    except ValueError as exc:
        raise LlmpressError(f"auto: {exc}: choose weight methods such as gptq, rtn, hqq, sparsegpt") from None
    describe_spec(calib["data"])
    dev = resolve_device(device)
    loaded = _loaded(model, tokenizer)
    if loaded.tokenizer is None:
        raise LlmpressError("auto needs calibration text but the model has no tokenizer: pass one")
    check_seq_len(loaded.model, calib["seq_len"], "calibration seq_len")
    arch = arch_for(loaded.model)
    key = {"model": loaded.source, "calibration": calib, "fisher_samples": fisher_samples}
    sens = _saved_table(table, key, candidates)
    if sens is None:
        ids = calibration_samples(loaded.tokenizer, calib["data"], calib["samples"], calib["seq_len"], calib["seed"])
        fisher = output_fisher(loaded.model, arch, ids[:max(1, fisher_samples)], device=dev, progress=progress)
        sens = sensitivity(loaded.model, arch, ids, candidates, fisher, device=dev, progress=progress)
        if table is not None:
            write_text_atomic(Path(table).expanduser(), json.dumps({**key, **sens.to_dict()}))
    numel = sum(o * i for o, i in sens.shapes)
    rest = size_report(loaded.model)["size_bytes"] - sum(layer_bytes({"shape": list(s)}) for s in sens.shapes)
    costs, sizes = sens.cost.tolist(), sens.bytes.tolist()
    emb = None
    if embedding and target.kind == "bytes":
        emb = _embedding_row(loaded, table, key, calib, fisher_samples, list(bits), list(groups), dev, progress)
        rest -= int(emb.bytes[0])  # the embedding's dense bytes are now its row's first option
        costs, sizes = [*costs, emb.cost], [*sizes, emb.bytes]
    measured = None
    if target.kind == "ppl":
        eval_kw = {"data": eval_data, "seq_len": eval_seq_len, "max_windows": eval_windows}
        choice, measured = _meet_perplexity(loaded, sens, calib, target, eval_kw, rounds, device)
    else:
        limit = target.value * numel / 8 if target.kind == "bpw" else target.value - rest
        try:
            choice = allocate(costs, sizes, limit)
        except ValueError:
            smallest = sum(min(row) for row in sizes[:len(sens.layers)])
            held = "norms at 16 bits, the embedding at its smallest" if emb else "embeddings and norms at 16 bits"
            smallest_all = sum(min(row) for row in sizes) + rest
            raise LlmpressError(
                f"budget {target.text} is below what the candidates can reach: the smallest choice is "
                f"{8 * smallest / numel:.2f} bits/weight over the linears ({smallest_all / 1e6:.1f} MB with "
                f"the {(smallest_all - smallest) / 1e6:.1f} MB of {held}): raise the budget"
                f"{'' if 2 in bits else ' or allow 2 bits (--bits 2,3,4,8)'}") from None
    emb_choice = choice.pop() if emb is not None else 0
    emb_setting = emb.candidates[emb_choice] if emb is not None else Candidate(None)
    recipe = build_recipe(sens, choice, calib, name=f"auto-{target.text}", embedding=emb_setting)
    report = _report(sens, choice, target, numel, rest, calib, fisher_samples)
    if emb is not None:
        _add_embedding(report, emb, emb_choice)
    if measured is not None:
        report["perplexity_rounds"] = measured
    return AutoResult(recipe, sens, choice, report, emb, emb_choice)


def _embedding_row(loaded, table, key: dict, calib: dict, fisher_samples: int, bits: list[int], groups: list[int],
                   device, progress: bool) -> EmbeddingSensitivity:
    """The embedding's costs: from ``table`` when it holds them for these candidates, else measured (and added
    to ``table``, whose block-linear costs are then already there)."""
    candidates = embedding_candidates(bits, groups)
    path = None if table is None else Path(table).expanduser()
    data = json.loads(path.read_text()) if path is not None and path.exists() else None
    if data is not None and data.get("embedding") is not None:
        try:
            return EmbeddingSensitivity.from_dict(data["embedding"], candidates)
        except (ValueError, KeyError, TypeError) as exc:
            raise LlmpressError(f"sensitivity table {path} cannot be reused: {first_line(exc)}: give a new --table "
                                "path to measure again") from None
    ids = calibration_samples(loaded.tokenizer, calib["data"], calib["samples"], calib["seq_len"], calib["seed"])
    row = embedding_sensitivity(loaded.model, ids, fisher_samples, candidates, device=device, progress=progress)
    if data is not None:
        write_text_atomic(path, json.dumps({**data, "embedding": row.to_dict()}))
    return row


def _add_embedding(report: dict, emb: EmbeddingSensitivity, index: int) -> None:
    """The embedding's setting in ``report``: its own entry, and its cost in the predicted totals."""
    label = emb.candidates[index].label
    report["embedding"] = {"layer": emb.layer, "setting": label, "tied": emb.tied, "bytes": int(emb.bytes[index]),
                           "bits_per_weight": 8 * emb.bytes[index] / (emb.shape[0] * emb.shape[1]),
                           "cost": emb.cost[index], "lookup_cost": emb.lookup[index], "head_cost": emb.head[index]}
    report["size_bytes"] += int(emb.bytes[index])
    report["predicted_nll_increase"] += emb.cost[index]
    report["predicted_ppl_ratio"] = math.exp(report["predicted_nll_increase"])


def smallest_within(costs: list[list[float]], sizes: list[list[float]], allowed: float) -> list[int]:
    """The allocation of the smallest byte budget whose predicted cost is at most ``allowed`` (bisection on
    the budget; the allocation's cost falls as its budget grows). The largest allocation when none is."""
    low, high = sum(min(r) for r in sizes), sum(max(r) for r in sizes)
    best = allocate(costs, sizes, high)
    if total(costs, best) > allowed:
        return best
    for _ in range(40):
        if high - low < 1:
            break
        middle = (low + high) / 2
        choice = allocate(costs, sizes, middle)
        if total(costs, choice) <= allowed:
            high, best = middle, choice
        else:
            low = middle
    return best


def _meet_perplexity(loaded, sens: Sensitivity, calib: dict, target: Budget, eval_kw: dict, rounds: int,
                     device: str) -> tuple[list[int], list[dict]]:
    """Rounds of propose (the smallest allocation whose corrected prediction meets the target), compress and
    measure; the predicted increase of the NLL is scaled by measured / predicted of the last round. Returns
    the smallest allocation that met the target, and every round's figures."""
    from .api import compress, evaluate

    dense = copy.deepcopy(loaded.model)  # compress rewrites the model it is given
    base = evaluate(dense, tokenizer=loaded.tokenizer, measure_speed=False, **eval_kw)["perplexity"]
    if base > target.value:
        raise LlmpressError(f"budget {target.text}: the uncompressed model already has perplexity {base:.2f} on "
                            f"{eval_kw['data']}: set a target above it")
    costs, sizes = sens.cost.tolist(), sens.bytes.tolist()
    numel = sum(o * i for o, i in sens.shapes)
    scale, best, history = 1.0, None, []  # measured / predicted increase of the mean NLL, from the last round
    for _ in range(rounds):
        choice = smallest_within(costs, sizes, math.log(target.value / base) / scale)
        if any(h["choice"] == choice for h in history) or all(sens.candidates[i].method is None for i in choice):
            break  # the corrected prediction proposes a recipe already measured, or no compression at all
        result = compress(copy.deepcopy(dense), build_recipe(sens, choice, calib), tokenizer=loaded.tokenizer,
                          device=device)
        ppl = evaluate(result, measure_speed=False, **eval_kw)["perplexity"]
        predicted = total(costs, choice)
        history.append({"choice": choice, "linear_bits_per_weight": 8 * total(sizes, choice) / numel,
                        "predicted_ppl": base * math.exp(predicted), "measured_ppl": ppl, "base_ppl": base})
        if ppl <= target.value and (best is None or total(sizes, choice) < total(sizes, best)):
            best = choice
        if predicted > 0:
            scale = min(max(math.log(ppl / base) / predicted, 0.1), 10.0)
    if best is None and not history:
        raise LlmpressError(f"budget {target.text} leaves nothing to compress: the prediction says every layer must "
                            "stay dense; set a looser target")
    if best is None:
        last = history[-1]
        raise LlmpressError(f"budget {target.text} was not met in {len(history)} round(s): the last recipe, at "
                            f"{last['linear_bits_per_weight']:.2f} bits/weight, measured {last['measured_ppl']:.2f}: "
                            "allow more rounds (--rounds) or set a looser target")
    return best, [{k: v for k, v in h.items() if k != "choice"} for h in history]


def _saved_table(table: str | Path | None, key: dict, candidates: list) -> Sensitivity | None:
    """The costs saved in ``table`` for this model, calibration and candidates; None when there is no file."""
    if table is None or not Path(table).expanduser().exists():
        return None
    path = Path(table).expanduser()
    try:
        data = json.loads(path.read_text())
        stale = {k: data.get(k) for k in key if data.get(k) != key[k]}
        if stale:
            raise ValueError(f"it was measured with {stale}, not {({k: key[k] for k in stale})}")
        return Sensitivity.from_dict(data, candidates)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LlmpressError(f"sensitivity table {path} cannot be reused: {first_line(exc)}: give a new --table "
                            "path to measure again") from None


def build_recipe(sens: Sensitivity, choice: list[int], calibration: dict, name: str | None = None,
                 embedding: Candidate | None = None) -> Recipe:
    """The recipe carrying a choice: per method one stage, its most common setting as the stage's args and
    every other setting as an override of the layers that take it (a layer type's pattern, e.g.
    ``*.self_attn.v_proj``, when all layers of that type take it); dense layers are left out. A quantized
    ``embedding`` setting comes first, as its own stage, so that the blocks calibrate on what they will see."""
    chosen = {layer: sens.candidates[i] for layer, i in zip(sens.layers, choice)}
    by_method: dict[str, dict[str, Any]] = {}
    for layer, cand in chosen.items():
        if cand.method is not None:
            by_method.setdefault(cand.method, {})[layer] = cand.config
    stages = []
    if embedding is not None and embedding.method is not None:
        stages.append({"method": embedding.method, "args": dataclasses.asdict(embedding.config)})
    for method, layers in by_method.items():
        configs = Counter(layers.values())
        base = configs.most_common(1)[0][0]
        stage: dict = {"method": method, "args": dataclasses.asdict(base)}
        if len(by_method) > 1 or len(layers) < len(chosen):
            stage["targets"] = _patterns(sorted(layers, key=sens.layers.index), sens.layers, set(layers))
        overrides = []
        for config, _count in configs.most_common()[1:]:
            names = [n for n in sens.layers if layers.get(n) == config]
            extra = {k: v for k, v in dataclasses.asdict(config).items() if stage["args"].get(k) != v}
            overrides.append({"targets": _patterns(names, sens.layers, set(names)), "args": extra})
        if overrides:
            stage["overrides"] = overrides
        stages.append(stage)
    if not stages:
        raise LlmpressError("the budget leaves every layer dense: there is nothing to compress")
    return Recipe.from_dict({"calibration": calibration, "stages": stages}, name=name)


def _patterns(names: list[str], every: list[str], members: set[str]) -> list[str]:
    """``names`` with each complete layer type (all layers ending ``.self_attn.v_proj`` among ``every`` are
    in ``members``) folded into one pattern ``*.self_attn.v_proj``."""
    out, done = [], set()
    for name in names:
        kind = ".".join(name.split(".")[-2:])
        pattern = f"*.{kind}"
        same = [n for n in every if fnmatch.fnmatchcase(n, pattern)]
        if all(n in members for n in same):
            if pattern not in done:
                out.append(pattern)
                done.add(pattern)
        else:
            out.append(name)
    return out


def _report(sens: Sensitivity, choice: list[int], target: Budget, numel: int, rest: int, calib: dict,
            fisher_samples: int) -> dict:
    linear_bytes = total(sens.bytes.tolist(), choice)
    predicted = total(sens.cost.tolist(), choice)
    labels = [sens.candidates[i].label for i in choice]
    return {
        "budget": target.text,
        "linear_bits_per_weight": 8 * linear_bytes / numel,
        "linear_bytes": int(linear_bytes),
        "size_bytes": int(linear_bytes + rest),
        "predicted_nll_increase": predicted,
        "predicted_ppl_ratio": math.exp(predicted),
        "settings": dict(Counter(labels).most_common()),
        "layers": [{"layer": n, "setting": lab, "bytes": int(sens.bytes[r, i]), "cost": float(sens.cost[r, i])}
                   for r, (n, lab, i) in enumerate(zip(sens.layers, labels, choice))],
        "calibration": calib,
        "fisher_samples": fisher_samples,
        "estimate": "Fisher-weighted output error: 1/2 sum_o F_o (dW H dW^T)_oo (llmpress.sensitivity)",
    }


def format_report(report: dict) -> str:
    """A few lines a person reads: the size reached, the predicted loss, the settings and where they went."""
    lines = [f"budget {report['budget']}: {report['linear_bits_per_weight']:.3f} bits/weight over the linears, "
             f"{report['size_bytes'] / 1e6:.1f} MB in all; predicted perplexity x{report['predicted_ppl_ratio']:.3f}"]
    if report.get("embedding"):
        e = report["embedding"]
        lines.append(f"embedding ({e['layer']}{', tied with the head' if e['tied'] else ''}): {e['setting']}, "
                     f"{e['bits_per_weight']:.3f} bits/weight, {e['bytes'] / 1e6:.1f} MB")
    for k, r in enumerate(report.get("perplexity_rounds", []), 1):
        lines.append(f"round {k}: {r['linear_bits_per_weight']:.3f} bits/weight, perplexity predicted "
                     f"{r['predicted_ppl']:.2f}, measured {r['measured_ppl']:.2f} (base {r['base_ppl']:.2f})")
    lines += ["", "| setting | layers |", "|---|---:|"]
    lines += [f"| {label} | {count} |" for label, count in report["settings"].items()]
    kinds: dict[str, Counter] = {}
    for row in report["layers"]:
        kinds.setdefault(".".join(row["layer"].split(".")[-2:]), Counter())[row["setting"]] += 1
    lines += ["", "| layer type | settings |", "|---|---|"]
    for kind, counts in kinds.items():
        lines.append(f"| {kind} | {', '.join(f'{s} x{c}' for s, c in counts.most_common())} |")
    return "\n".join(lines)


def to_yaml(recipe: Recipe) -> str:
    import yaml

    data = recipe.to_dict()
    data.pop("name", None)
    return yaml.safe_dump(data, sort_keys=False)



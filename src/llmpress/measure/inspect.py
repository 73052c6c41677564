"""``llmpress inspect``: which layers and blocks a compression hurt, from a folder's ``llmpress.json`` alone.

``llmpress compress`` records per rewritten linear its relative error against the original weight
(``layers[name]["output_error"]`` on the calibration data, or ``"weight_error"`` when the recipe had
none; ``llmpress.measure.attribution``) and per block the relative change of its output
(``blocks[name]["output_error"]``). :func:`summarize` ranks one folder's records: the worst linears,
the worst blocks, and the mean per layer type (``self_attn.q_proj`` … ``mlp.down_proj``, the name
inside the block) so that the type that dominates stands out. :func:`compare` lines up two folders
(say gptq-w4-g64 and rtn-w4-g64 of one model) and sorts the layers and blocks by how much their
errors differ: a bisect of a perplexity gap. No model is loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import LlmpressError
from .attribution import block_errors, layer_errors

META_FILE = "llmpress.json"  # as in llmpress.save, which this layer may not import
DESCRIPTIONS = {
    "output_error": "relative output error on the calibration data, ‖XWᵀ − XŴᵀ‖²/‖XWᵀ‖²",
    "weight_error": "relative weight error ‖W − Ŵ‖²/‖W‖² (no calibration data)",
}
_BLOCK = re.compile(r"^(.*?\.\d+)\.(.+)$")  # "model.layers.3" + "self_attn.q_proj"


def read_meta(folder: str | Path) -> dict:
    """The ``llmpress.json`` of ``folder`` (or that file itself); a one-line error when there is none."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise LlmpressError(f"{path} does not exist: give a folder written by 'llmpress compress'")
    file = path / META_FILE if path.is_dir() else path
    if not file.is_file():
        raise LlmpressError(f"{path} has no {META_FILE}: inspect reads the records 'llmpress compress' writes "
                            "there; give a folder it wrote")
    try:
        meta = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LlmpressError(f"{file} is not valid JSON ({exc.__class__.__name__}): compress the model again "
                            "to rewrite it") from None
    if not isinstance(meta, dict):
        raise LlmpressError(f"{file} is not an llmpress record (a JSON object): compress the model again")
    return meta


def layer_type(name: str) -> str:
    """The name inside the block ("model.layers.3.self_attn.q_proj" -> "self_attn.q_proj"), expert
    indices starred; a layer outside the blocks (lm_head) is its own type."""
    match = _BLOCK.match(name)
    inner = match.group(2) if match else name
    return ".".join("*" if part.isdigit() else part for part in inner.split("."))


def block_of(name: str) -> str | None:
    """The block a layer belongs to ("model.layers.3"), or None outside the blocks."""
    match = _BLOCK.match(name)
    return match.group(1) if match else None


def _records(folder: str | Path) -> tuple[dict, str | None, dict[str, float], dict[str, float]]:
    meta = read_meta(folder)
    metric, layers = layer_errors(meta.get("layers"))
    blocks = block_errors(meta.get("blocks"))
    if not layers and not blocks:
        raise LlmpressError(f"{folder} has no per-layer error records in {META_FILE} (written before llmpress "
                            "recorded them, or by a recipe whose stages record none): compress the model again "
                            "with this version")
    return meta, metric, layers, blocks


def _recipe_name(meta: dict) -> str | None:
    recipe = meta.get("recipe")
    return recipe.get("name") if isinstance(recipe, dict) else None


def by_type(errors: dict[str, float]) -> dict[str, dict]:
    """Per layer type: mean, max, the layer with the max and the count, sorted by mean (worst first)."""
    groups: dict[str, list[tuple[str, float]]] = {}
    for name, value in errors.items():
        groups.setdefault(layer_type(name), []).append((name, value))
    rows = {}
    for kind, items in groups.items():
        worst = max(items, key=lambda item: item[1])
        rows[kind] = {"mean": sum(v for _, v in items) / len(items), "max": worst[1], "worst": worst[0],
                      "count": len(items)}
    return dict(sorted(rows.items(), key=lambda item: -item[1]["mean"]))


def _worst(errors: dict[str, float], top: int) -> list[dict]:
    ranked = sorted(errors.items(), key=lambda item: -item[1])[:top]
    return [{"name": name, "error": value} for name, value in ranked]


def _check_top(top: int) -> None:
    if not isinstance(top, int) or top < 1:
        raise LlmpressError(f"--top {top} is too small: show at least 1 row, e.g. --top 10")


def summarize(folder: str | Path, top: int = 10) -> dict:
    """One folder's records ranked: worst ``top`` linears and blocks, and the mean per layer type."""
    _check_top(top)
    meta, metric, layers, blocks = _records(folder)
    return {"folder": str(folder), "recipe": _recipe_name(meta), "metric": metric,
            "layers_recorded": len(layers), "blocks_recorded": len(blocks),
            "worst_layers": _worst(layers, top), "worst_blocks": _worst(blocks, top), "by_type": by_type(layers),
            "mean_layer_error": sum(layers.values()) / len(layers) if layers else None}


def _ratio(a: float, b: float) -> float | None:
    return b / a if a > 0 else None


def _differences(a: dict[str, float], b: dict[str, float], top: int) -> list[dict]:
    common = [name for name in a if name in b]
    rows = [{"name": n, "a": a[n], "b": b[n], "diff": b[n] - a[n], "ratio": _ratio(a[n], b[n])} for n in common]
    return sorted(rows, key=lambda row: -abs(row["diff"]))[:top]


def compare(folder_a: str | Path, folder_b: str | Path, top: int = 10) -> dict:
    """Where two folders' errors differ most: layers and blocks sorted by |B − A|, and per layer type."""
    _check_top(top)
    meta_a, metric_a, layers_a, blocks_a = _records(folder_a)
    meta_b, metric_b, layers_b, blocks_b = _records(folder_b)
    if metric_a != metric_b:
        layers_a, layers_b = {}, {}  # an output error and a weight error do not compare
    common_layers = [n for n in layers_a if n in layers_b]
    common_blocks = [n for n in blocks_a if n in blocks_b]
    if not common_layers and not common_blocks:
        raise LlmpressError(f"{folder_a} and {folder_b} have no layer or block with the same kind of error record "
                            f"({metric_a or 'blocks only'} vs {metric_b or 'blocks only'}): compare folders of "
                            "one model, both compressed with calibration data or both without")
    mean_a = {t: r["mean"] for t, r in by_type({n: layers_a[n] for n in common_layers}).items()}
    mean_b = {t: r["mean"] for t, r in by_type({n: layers_b[n] for n in common_layers}).items()}
    types = [{"type": t, "a": mean_a[t], "b": mean_b[t], "diff": mean_b[t] - mean_a[t],
              "ratio": _ratio(mean_a[t], mean_b[t])} for t in mean_a]
    return {"a": {"folder": str(folder_a), "recipe": _recipe_name(meta_a)},
            "b": {"folder": str(folder_b), "recipe": _recipe_name(meta_b)},
            "metric": metric_a if common_layers else None,
            "layers_compared": len(common_layers), "blocks_compared": len(common_blocks),
            "layers": _differences(layers_a, layers_b, top), "blocks": _differences(blocks_a, blocks_b, top),
            "by_type": sorted(types, key=lambda row: -abs(row["diff"]))}


def _label(side: dict) -> str:
    return f"{side['folder']}" + (f" ({side['recipe']})" if side.get("recipe") else "")


def _table(headers: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> list[str]:
    """Aligned text columns: names (``left``) flush left, numbers flush right."""
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if k in left else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    return [line(headers).rstrip()] + [line(r).rstrip() for r in rows]


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3e}"


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def format_summary(summary: dict) -> str:
    """The text ``llmpress inspect FOLDER`` prints."""
    head = _label(summary)
    out = [f"{head}: {summary['layers_recorded']} linears, {summary['blocks_recorded']} blocks with error records"]
    if summary["worst_layers"]:
        out += ["", f"worst linears ({DESCRIPTIONS[summary['metric']]}):"]
        out += _table(["layer", summary["metric"]], [[r["name"], _num(r["error"])] for r in summary["worst_layers"]])
        out += ["", "by layer type (mean over blocks, worst first):"]
        out += _table(["type", "mean", "max", "layers", "worst layer"],
                      [[t, _num(r["mean"]), _num(r["max"]), str(r["count"]), r["worst"]]
                       for t, r in summary["by_type"].items()], left=(0, 4))
    if summary["worst_blocks"]:
        out += ["", "worst blocks (relative change of the block output on the calibration data):"]
        out += _table(["block", "output_error"], [[r["name"], _num(r["error"])] for r in summary["worst_blocks"]])
    return "\n".join(out)


def format_comparison(comparison: dict) -> str:
    """The text ``llmpress inspect A B`` prints."""
    out = [f"A = {_label(comparison['a'])}", f"B = {_label(comparison['b'])}"]
    headers = ["A", "B", "B − A", "B / A"]

    def rows(items: list[dict], key: str) -> list[list[str]]:
        return [[r[key], _num(r["a"]), _num(r["b"]), f"{r['diff']:+.3e}", _times(r["ratio"])] for r in items]

    if comparison["layers"]:
        out += ["", f"linears whose errors differ most ({comparison['layers_compared']} compared; "
                    f"{DESCRIPTIONS[comparison['metric']]}):"]
        out += _table(["layer", *headers], rows(comparison["layers"], "name"))
        out += ["", "by layer type (mean over blocks):"]
        out += _table(["type", *headers], rows(comparison["by_type"], "type"))
    if comparison["blocks"]:
        out += ["", f"blocks whose output change differs most ({comparison['blocks_compared']} compared):"]
        out += _table(["block", *headers], rows(comparison["blocks"], "name"))
    return "\n".join(out)

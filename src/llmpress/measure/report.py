"""Collect per-model measurements into one comparison report (JSON + Markdown).

Each row is one model (the uncompressed base and its compressed variants),
in the flat form ``llmpress.evaluate`` returns: top-level ``perplexity``,
``params``, ``size_bytes``, ``bits_per_weight``, ``compression_ratio``,
``flops_per_token``, ``peak_memory_bytes``, ``compress_time_s`` and a
nested ``speed`` section;
the report adds the perplexity change against the base and renders a table
where a missing measurement shows as an en dash.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

from llmpress.errors import LlmpressError
from llmpress.paths import make_public

log = logging.getLogger(__name__)

COLUMNS = [
    "model", "ppl", "Δppl %", "params (nonzero)", "bits/weight", "size MB", "ratio",
    "GFLOPs/token", "prefill ms", "decode tok/s", "peak MB", "compress s",
]  # fmt: skip
MISSING = "–"


def _jsonable(value):
    """Recursively turn a value into plain JSON types (non-finite floats -> None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return _jsonable(value.item())
    return str(value)


def _get(row: dict, *keys):
    """Nested lookup that returns None when any level is missing."""
    value = row
    for key in keys:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value


def build_report(rows: list[dict], base_name: str = "base") -> dict:
    """Assemble rows into a report, adding ``delta_perplexity_pct`` vs the base.

    ``delta_perplexity_pct = 100 * (ppl - base_ppl) / base_ppl`` for every
    non-base row (None where either perplexity is missing); the base row gets
    None. The input rows are copied, not modified.
    """
    names = [row.get("name") for row in rows]
    if any(not isinstance(n, str) or not n for n in names):
        raise LlmpressError("build_report: every row needs a non-empty 'name'")
    if len(set(names)) != len(names):
        raise LlmpressError(f"build_report: row names must be unique, got {names}")
    if base_name not in names:
        raise LlmpressError(f"build_report: no row named {base_name!r} (rows: {', '.join(names)})")
    base_ppl = rows[names.index(base_name)].get("perplexity")
    out_rows = []
    for row in rows:
        row = dict(row)
        ppl = row.get("perplexity")
        delta = None
        if row["name"] != base_name and ppl is not None and base_ppl:
            delta = 100.0 * (ppl - base_ppl) / base_ppl
        row["delta_perplexity_pct"] = delta
        out_rows.append(row)
    return _jsonable({"rows": out_rows, "base": base_name, "columns": list(COLUMNS)})


def _num(value, digits: int = 2) -> str:
    """Fixed-point number, or the missing mark."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return f"{value:,.{digits}f}"


def _sig(value, scale: float = 1.0) -> str:
    """A number scaled down and shown with about three significant digits."""
    if value is None:
        return MISSING
    x = value / scale
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.{2 if abs(x) < 10 else 1}f}"


def _count(value) -> str:
    """Parameter count as 1.23B / 135.0M / 12.3k."""
    if value is None:
        return MISSING
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.{2 if scale == 1e9 else 1}f}{unit}"
    return str(value)


def _params_cell(row: dict) -> str:
    """``total (nonzero)``; just the total when nothing was zeroed."""
    params = row.get("params") or {}
    total, nonzero = params.get("total"), params.get("nonzero")
    if total is None:
        return MISSING
    if nonzero is None or nonzero == total:
        return _count(total)
    return f"{_count(total)} ({_count(nonzero)})"


def _cells(row: dict) -> list[str]:
    """One table row's cells, in COLUMNS order."""
    delta = row.get("delta_perplexity_pct")
    ratio = row.get("compression_ratio")
    latency = _get(row, "speed", "prefill_latency_s")
    return [
        str(row["name"]).replace("|", "\\|"),
        _num(row.get("perplexity")),
        MISSING if delta is None else f"{delta:+.2f}",
        _params_cell(row),
        _num(row.get("bits_per_weight")),
        _sig(row.get("size_bytes"), 1e6),
        MISSING if ratio is None else f"{ratio:.2f}×",
        _sig(row.get("flops_per_token"), 1e9),
        _num(None if latency is None else latency * 1000, 1),
        _num(_get(row, "speed", "decode_tokens_per_s"), 1),
        _sig(row.get("peak_memory_bytes"), 1e6),
        _num(row.get("compress_time_s"), 1),
    ]


def _notes(rows: list[dict]) -> list[str]:
    """Each distinct note once, with the rows it applies to unless it applies to all."""
    by_note: dict[str, list[str]] = {}
    for row in rows:
        notes = row.get("notes") or []
        for note in [notes] if isinstance(notes, str) else notes:
            by_note.setdefault(str(note), []).append(str(row["name"]))
    if not by_note:
        return []
    lines = [""]
    for note, names in by_note.items():
        lines.append(f"- {note}" if len(names) == len(rows) else f"- **{', '.join(names)}**: {note}")
    return lines


def report_markdown(report: dict) -> str:
    """The report as a Markdown table (MB = 10^6 bytes), notes listed below it."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in report.get("rows", [])]
    lines += _notes(report.get("rows", []))
    base = report.get("base")
    if base:
        lines += ["", f"Δppl % is relative to `{base}`."]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        make_public(Path(tmp))  # mkstemp makes it 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: dict, folder: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` (indent 2) and ``report.md`` into ``folder``."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlmpressError(f"cannot create report folder {str(folder)!r}: {exc}") from exc
    json_path, md_path = folder / "report.json", folder / "report.md"
    _write_atomic(json_path, json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    _write_atomic(md_path, report_markdown(report))
    log.info("wrote %s and %s", json_path, md_path)
    return json_path, md_path

"""Collect per-model measurements into one comparison report (JSON + Markdown).

Each row is one model (the uncompressed base and its compressed variants),
in the flat form ``llmpress.evaluate`` returns: top-level ``perplexity``,
``params``, ``size_bytes``, ``bits_per_weight``, ``compression_ratio``,
``flops_per_token``, ``peak_memory_bytes``, ``compress_time_s`` and a
nested ``speed`` section;
the report adds the perplexity change against the base and renders a table
where a missing measurement shows as an en dash. Optional row entries: ``tasks``
(lm-eval results, ``{task: {"metric", "value", "stderr"}}``) get a table of their
own, ``errors`` (per-layer error records, ``llmpress.measure.plots.error_records``)
a list of the worst layers; :func:`write_report` adds PNG plots (``plots.py``).
Speed cells show the median over the repeats with the range in brackets, and a
mark when the machine was busy while timing (``speed.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

from llmpress.errors import LlmpressError
from llmpress.measure.speed import peak_load
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
    return [
        _escape(row["name"]),
        _num(row.get("perplexity")),
        MISSING if delta is None else f"{delta:+.2f}",
        _params_cell(row),
        _num(row.get("bits_per_weight")),
        _sig(row.get("size_bytes"), 1e6),
        MISSING if ratio is None else f"{ratio:.2f}×",
        _sig(row.get("flops_per_token"), 1e9),
        _speed_cell(row, "prefill_latency_s", 1000),
        _speed_cell(row, "decode_tokens_per_s"),
        _sig(row.get("peak_memory_bytes"), 1e6),
        _num(row.get("compress_time_s"), 1),
    ]


BUSY_MARK = "†"


def _speed_cell(row: dict, key: str, scale: float = 1.0) -> str:
    """The median, its range over the repeats in brackets, and the busy mark when the machine was busy."""
    value = _get(row, "speed", key)
    if value is None:
        return MISSING
    text = _num(value * scale, 1)
    low, high = _get(row, "speed", f"{key}_min"), _get(row, "speed", f"{key}_max")
    if (_get(row, "speed", "repeats") or 1) > 1 and low is not None and high is not None:
        text += f" ({_num(low * scale, 1)}–{_num(high * scale, 1)})"
    return text + (BUSY_MARK if _get(row, "speed", "busy") else "")


def _load(speed: dict) -> float | None:
    return peak_load(speed.get("load_before"), speed.get("load_after"))


def _speed_notes(rows: list[dict]) -> list[str]:
    """How the speed cells were measured, and which rows were timed on a busy machine."""
    timed = [row for row in rows if isinstance(row.get("speed"), dict)]
    lines = []
    repeats = sorted({row["speed"].get("repeats") for row in timed if (row["speed"].get("repeats") or 1) > 1})
    if repeats:
        runs = " or ".join(str(r) for r in repeats)
        lines.append(f"- prefill ms and decode tok/s: median of {runs} runs, the fastest and slowest in brackets.")
    busy = [row for row in timed if row["speed"].get("busy")]
    if busy:
        which = ", ".join(f"**{row['name']}** (load {_num(_load(row['speed']), 1)} on "
                          f"{row['speed'].get('cpus', '?')} cores)" for row in busy)
        lines.append(f"- {BUSY_MARK} the machine was busy while timing {which}: the 1-minute load average exceeded "
                     "the cores available, so other work shared the CPU and these speed figures are not comparable.")
    return lines


def _notes(rows: list[dict]) -> list[str]:
    """Each distinct note once, with the rows it applies to unless it applies to all."""
    by_note: dict[str, list[str]] = {}
    for row in rows:
        notes = row.get("notes") or []
        for note in [notes] if isinstance(notes, str) else notes:
            by_note.setdefault(str(note), []).append(str(row["name"]))
    if not by_note:
        return []
    lines = []
    for note, names in by_note.items():
        lines.append(f"- {note}" if len(names) == len(rows) else f"- **{', '.join(names)}**: {note}")
    return lines


def _task_table(rows: list[dict]) -> list[str]:
    """lm-eval results, one column per task: value ± standard error."""
    tasks: dict[str, str] = {}
    for row in rows:
        for task, entry in (row.get("tasks") or {}).items():
            if isinstance(entry, dict):
                tasks.setdefault(task, str(entry.get("metric") or "acc"))
    if not tasks:
        return []
    lines = ["", "| model | " + " | ".join(f"{t} ({m})" for t, m in tasks.items()) + " |",
             "|---|" + "---:|" * len(tasks)]
    for row in rows:
        cells = []
        for task in tasks:
            entry = (row.get("tasks") or {}).get(task) or {}
            value, err = entry.get("value"), entry.get("stderr")
            cells.append(MISSING if value is None else _num(value, 4) + ("" if err is None else f" ± {err:.4f}"))
        lines.append(f"| {_escape(row['name'])} | " + " | ".join(cells) + " |")
    return lines


def _escape(name) -> str:
    return str(name).replace("|", "\\|")


def _worst_layers(rows: list[dict], count: int = 3) -> list[str]:
    """Per model with error records: its largest per-linear errors and its worst block."""
    lines = []
    for row in rows:
        errors = row.get("errors")
        if not isinstance(errors, dict) or not errors.get("layers"):
            continue
        layers = sorted(errors["layers"].items(), key=lambda kv: kv[1], reverse=True)[:count]
        text = ", ".join(f"`{name}` {value:.3g}" for name, value in layers)
        blocks = errors.get("blocks") or {}
        if blocks:
            name, value = max(blocks.items(), key=lambda kv: kv[1])
            text += f"; worst block `{name}` {value:.3g}"
        lines.append(f"- **{row['name']}** ({errors.get('metric', 'error')}): {text}")
    return ["", "Largest per-layer errors (relative to the original layer):", "", *lines] if lines else []


def report_markdown(report: dict, plots: list[tuple[str, str]] = ()) -> str:
    """The report as a Markdown table (MB = 10^6 bytes), notes listed below it, then the task results, the
    largest per-layer errors and ``plots`` ((title, file name) pairs, linked relative to the report)."""
    rows = report.get("rows", [])
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    notes = _notes(rows) + _speed_notes(rows)
    lines += [""] + notes if notes else []
    base = report.get("base")
    if base:
        lines += ["", f"Δppl % is relative to `{base}`."]
    lines += _task_table(rows) + _worst_layers(rows)
    for title, filename in plots:
        lines += ["", f"![{title}]({filename})"]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str | None, write=None) -> None:
    """Write ``text`` (or call ``write(binary file)``) to a temp file beside ``path`` and rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if write is not None:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
        make_public(Path(tmp))  # mkstemp makes it 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_plots(report: dict, folder: Path) -> list[tuple[str, str]]:
    """Write the PNG plots the report's rows hold enough for (``llmpress.measure.plots``) into ``folder``;
    returns their (title, file name). None are written, and one log line says why, without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("report.md and report.json only: the plots need matplotlib (pip install llmpress[report])")
        return []
    from llmpress.measure.plots import figures

    written = []
    for filename, title, fig in figures(report.get("rows", []), report.get("base")):
        _write_atomic(folder / filename, None, lambda fh, fig=fig: fig.savefig(fh, format="png"))
        written.append((title, filename))
    return written


def write_report(report: dict, folder: str | Path, plots: bool = True) -> tuple[Path, Path]:
    """Write ``report.json`` (indent 2), the PNG plots (when ``plots`` and matplotlib is installed) and
    ``report.md``, which links the plots, into ``folder``."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlmpressError(f"cannot create report folder {str(folder)!r}: {exc}") from exc
    json_path, md_path = folder / "report.json", folder / "report.md"
    _write_atomic(json_path, json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    written = write_plots(report, folder) if plots else []
    _write_atomic(md_path, report_markdown(report, written))
    log.info("wrote %s", ", ".join(str(folder / f) for f in ["report.json", *(f for _, f in written), "report.md"]))
    return json_path, md_path

"""The report's pictures: size against perplexity and task accuracy with the Pareto front, per-layer errors.

Pure functions over report rows (the dicts ``llmpress.evaluate`` returns). Each ``*_figure`` returns a
``matplotlib.figure.Figure``, or None when the rows hold too little to draw (fewer than two models with both
figures, no task results, no error records). Figures are built without pyplot, so the process's plotting backend
is never switched and nothing is displayed; matplotlib (the ``report`` extra) is imported only inside them.

Error records: a row may carry ``errors = {"metric": "output_error" | "weight_error", "layers": {linear: float},
"blocks": {block: float}}`` (see :func:`error_records`).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence

from llmpress.measure.attribution import block_errors, layer_errors

MB = 1e6
BASE_STYLE = {"marker": "*", "s": 160, "color": "black"}
MARKERS = "osD^vPXhp<>"


def pareto_front(points: Sequence[tuple[float, float] | None]) -> list[int]:
    """Indices of the points no other point dominates when both coordinates are minimized, in ascending x.

    A point dominates another when it is no worse in both coordinates and better in one; equal points do not
    dominate each other, so both stay on the front. None and non-finite points are never on it.
    """
    valid = [(p[0], p[1], i) for i, p in enumerate(points)
             if p is not None and all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)]
    front, best = [], math.inf
    for _, group in itertools.groupby(sorted(valid), key=lambda v: v[0]):  # the points at one x, ascending y
        group = list(group)
        lowest = group[0][1]
        if lowest < best:
            front += [i for _, y, i in group if y == lowest]
            best = lowest
    return front


def error_records(layers: dict | None, blocks: dict | None = None) -> dict | None:
    """A row's ``errors`` entry from a folder's ``llmpress.json`` ``layers`` and ``blocks`` records.

    ``output_error`` (relative error of a linear's output on the calibration data) where any layer has it, else
    ``weight_error``; layers without the chosen record are left out, and so are non-finite values
    (``llmpress.measure.attribution.layer_errors``, which ``llmpress inspect`` reads too). None when no
    layer has either.
    """
    metric, found = layer_errors(layers)
    return None if metric is None else {"metric": metric, "layers": found, "blocks": block_errors(blocks)}


def _model_order(layers: dict) -> list[str]:
    """Layer names by block number (layers.10 after layers.9), in their recorded order within a block (the
    engine records them in execution order: q, k, v, o, gate, up, down)."""
    def key(item):
        k, name = item
        number = re.search(r"\.(\d+)\.", name)
        return (int(number.group(1)) if number else -1, k)

    return [name for _, name in sorted(enumerate(layers), key=key)]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _styles(names: list[str], base: str | None) -> dict[str, dict]:
    """One colour and marker per model, the same in every plot; the base is a black star."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    styles, k = {}, 0
    for name in names:
        if name == base:
            styles[name] = dict(BASE_STYLE)
        else:
            styles[name] = {"marker": MARKERS[k % len(MARKERS)], "s": 60, "color": cmap(k % cmap.N)}
            k += 1
    return styles


def _scatter_front(ax, rows: list[dict], xs: list, ys: list, errs: list | None, styles: dict, maximize: bool):
    """Points (with error bars), each labelled in the legend, and the Pareto front as a dashed staircase."""
    for row, x, y, err in zip(rows, xs, ys, errs or [None] * len(rows)):
        style = styles[row["name"]]
        if err:
            ax.errorbar([x], [y], yerr=[err], fmt="none", ecolor=style["color"], alpha=0.6, capsize=3, zorder=2)
        ax.scatter([x], [y], label=row["name"], zorder=3, edgecolors="white", linewidths=0.5, **style)
    front = pareto_front([(x, -y if maximize else y) for x, y in zip(xs, ys)])
    if len(front) > 1:
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", linestyle="--", color="0.4",
                linewidth=1.2, zorder=1, label="Pareto front")
    for i in front:
        ax.scatter([xs[i]], [ys[i]], s=styles[rows[i]["name"]]["s"] * 3, facecolors="none", edgecolors="0.3",
                   linewidths=1.0, zorder=2)
    return front


def _log_axis(ax) -> None:
    """A log y axis labelled 20, 50, 100, 200, ... rather than only at the powers of ten."""
    from matplotlib import ticker

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _label_points(ax, names: list[str], xs: list[float], ys: list[float], front: list[int],
                  gap: float = 0.045) -> None:
    """Name each point beside it: a point on the front on its left, where the front leaves nothing (the staircase
    goes on to the right), the others on their right; nearby labels are pushed apart upwards, with a leader line."""
    ax.autoscale_view()
    to_axes = ax.transData + ax.transAxes.inverted()  # depends on the limits and scales only, not the layout
    spots = [tuple(to_axes.transform((x, y))) for x, y in zip(xs, ys)]
    placed: list[tuple[bool, float, float]] = []
    for k in sorted(range(len(names)), key=lambda k: spots[k][1]):
        fx, fy = spots[k]
        left = (k in front and fx > 0.3) or fx > 0.78
        tx, ly = fx + (-0.035 if left else 0.035), fy
        for _ in placed:  # each step moves past one placed label, so this many steps always suffice
            clash = [py for side, px, py in placed
                     if side == left and abs(px - tx) < 0.2 and abs(py - ly) < gap * 0.999]
            if not clash:
                break
            ly = max(clash) + gap  # (max + gap) - max can round below gap: hence the 0.999 above
        placed.append((left, tx, ly))
        ax.annotate(names[k], (xs[k], ys[k]), xytext=(tx, ly), textcoords="axes fraction", fontsize=7.5,
                    ha="right" if left else "left", va="center", color="0.15", zorder=4,
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.6},
                    arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.6, "shrinkA": 1, "shrinkB": 7})


def _plottable(rows: list[dict], key) -> tuple[list[dict], list[float], list[float]]:
    kept, xs, ys = [], [], []
    for row in rows:
        x, y = row.get("size_bytes"), key(row)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y):
            kept.append(row)
            xs.append(x / MB)
            ys.append(float(y))
    return kept, xs, ys


def _legend(fig, axes) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    fig.legend([handles[label] for label in labels], labels, loc="outside right upper", fontsize=8,
               frameon=False)


def size_perplexity_figure(rows: list[dict], base: str | None = None):
    """Perplexity against size (MB) for every row that has both, the Pareto front (smaller and lower) marked."""
    kept, xs, ys = _plottable(rows, lambda r: r.get("perplexity"))
    if len(kept) < 2:
        return None
    fig = _figure(7.5, 5.0)
    ax = fig.add_subplot()
    front = _scatter_front(ax, kept, xs, ys, None, _styles([r["name"] for r in rows], base), maximize=False)
    if max(ys) / max(min(ys), 1e-12) > 4:
        _log_axis(ax)
    ax.set_xlim(0, max(xs) * 1.12)
    _label_points(ax, [r["name"] for r in kept], xs, ys, front)
    ax.set_xlabel("size (MB, 10^6 bytes)")
    ax.set_ylabel("perplexity" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    data = kept[0].get("data_description") or kept[0].get("data")
    ax.set_title(f"size vs perplexity{f' on {data}' if data else ''}\n"
                 f"lower left is better; {len(front)} of {len(kept)} models on the Pareto front (dashed)", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)  # no legend: every point is named beside it
    return fig


def _tasks(rows: list[dict]) -> list[str]:
    names = []
    for row in rows:
        for task in row.get("tasks") or {}:
            if task not in names:
                names.append(task)
    return names


def _task_value(row: dict, task: str, key: str):
    entry = (row.get("tasks") or {}).get(task)
    return entry.get(key) if isinstance(entry, dict) else None


def size_accuracy_figure(rows: list[dict], base: str | None = None):
    """One panel per task: accuracy (± lm-eval's standard error) against size, the Pareto front (smaller and more
    accurate) marked. Tasks are not averaged: their chance levels differ (2-way vs 4-way choices), and a recipe
    may trade one task for another, which a mean would hide."""
    tasks = [t for t in _tasks(rows) if len(_plottable(rows, lambda r, t=t: _task_value(r, t, "value"))[0]) >= 2]
    if not tasks:
        return None
    styles = _styles([r["name"] for r in rows], base)
    cols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / cols)
    fig = _figure(4.2 * cols + 2.5, 3.6 * nrows)
    axes = []
    for k, task in enumerate(tasks):
        ax = fig.add_subplot(nrows, cols, k + 1)
        kept, xs, ys = _plottable(rows, lambda r, t=task: _task_value(r, t, "value"))
        errs = [_task_value(r, task, "stderr") for r in kept]
        _scatter_front(ax, kept, xs, ys, errs, styles, maximize=True)
        metric = next((_task_value(r, task, "metric") for r in kept if _task_value(r, task, "metric")), "accuracy")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("size (MB)")
        ax.set_ylabel(str(metric))
        ax.set_xlim(0, max(xs) * 1.08)
        ax.grid(True, alpha=0.25)
        axes.append(ax)
    fig.suptitle("size vs task accuracy (± standard error) — upper left is better", fontsize=10)
    _legend(fig, axes)
    return fig


def _kind(layer: str) -> str:
    """The linear's role: its last name part (q_proj, down_proj, c_attn, ...)."""
    return layer.rsplit(".", 1)[-1]


def layer_error_figure(rows: list[dict]):
    """One panel per model with error records: a bar per linear (in model order, coloured by its role), and
    each block's output error as a black line over the block's linears."""
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    with_errors = [r for r in rows if isinstance(r.get("errors"), dict) and r["errors"].get("layers")]
    if not with_errors:
        return None
    kinds = list(dict.fromkeys(_kind(n) for r in with_errors for n in _model_order(r["errors"]["layers"])))
    cmap = colormaps["tab10" if len(kinds) <= 10 else "tab20"]
    colour = {kind: cmap(i % cmap.N) for i, kind in enumerate(kinds)}
    fig = _figure(11.0, 2.4 * len(with_errors) + 0.8)
    axes = fig.subplots(len(with_errors), 1, squeeze=False)[:, 0]
    for ax, row in zip(axes, with_errors):
        errors = row["errors"]
        names = _model_order(errors["layers"])
        values = [errors["layers"][n] for n in names]
        ax.bar(range(len(names)), values, width=1.0, color=[colour[_kind(n)] for n in names], linewidth=0)
        for block, value in (errors.get("blocks") or {}).items():
            span = [i for i, n in enumerate(names) if n.startswith(block + ".")]
            if span:
                ax.hlines(value, span[0] - 0.5, span[-1] + 0.5, colors="black", linewidth=1.5)
        worst = max(range(len(names)), key=values.__getitem__)
        ax.set_title(f"{row['name']}: {errors.get('metric', 'error')} per linear (worst: {names[worst]}, "
                     f"{values[worst]:.3g})", fontsize=9, loc="left")
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_ylabel("relative error", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, axis="y", alpha=0.25)
        ticks = _block_ticks(names)
        ax.set_xticks([t for t, _ in ticks], [label for _, label in ticks])
    axes[-1].set_xlabel("linear layers in model order (ticks: block index)")
    handles = [Patch(color=colour[k], label=k) for k in kinds]
    if any(r["errors"].get("blocks") for r in with_errors):
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="black", linewidth=1.5, label="block output"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    return fig


def _block_ticks(names: list[str], most: int = 16) -> list[tuple[int, str]]:
    """An x tick at the first linear of every k-th block (the first number in its name), at most ``most`` ticks."""
    firsts: dict[str, int] = {}
    for i, name in enumerate(names):
        number = re.search(r"\.(\d+)\.", name)
        firsts.setdefault(number.group(1) if number else name, i)
    every = max(1, math.ceil(len(firsts) / most))
    return [(i, label) for k, (label, i) in enumerate(firsts.items()) if k % every == 0]


PLOTS = (  # file name, title in report.md, figure function
    ("size_vs_perplexity.png", "Size vs perplexity", lambda rows, base: size_perplexity_figure(rows, base)),
    ("size_vs_accuracy.png", "Size vs task accuracy", lambda rows, base: size_accuracy_figure(rows, base)),
    ("layer_errors.png", "Per-layer errors", lambda rows, base: layer_error_figure(rows)),
)


def figures(rows: list[dict], base: str | None = None) -> list[tuple[str, str, object]]:
    """(file name, title, Figure) for every plot the rows hold enough for."""
    made = []
    for filename, title, make in PLOTS:
        fig = make(rows, base)
        if fig is not None:
            made.append((filename, title, fig))
    return made

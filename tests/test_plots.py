"""The report's plots: the Pareto front against a brute-force reference, PNGs written and embedded in report.md."""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import sys

import pytest

from llmpress.measure import build_report, report_markdown, write_report
from llmpress.measure.plots import (
    error_records,
    layer_error_figure,
    pareto_front,
    size_accuracy_figure,
    size_perplexity_figure,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _brute_front(points) -> set[int]:
    """Obviously correct: a valid point is on the front unless another is <= in both and < in one."""
    def valid(p):
        return p is not None and all(math.isfinite(v) for v in p)

    return {i for i, p in enumerate(points) if valid(p) and not any(
        valid(q) and q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)}


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 12)
        grid = rng.choice([3, 6, 50])  # small grids make ties in x, in y and whole duplicate points
        points = [(rng.randint(0, grid), rng.randint(0, grid)) for _ in range(n)]
        for k in range(n):
            if rng.random() < 0.1:
                points[k] = rng.choice([None, (math.nan, 1.0), (1.0, math.inf)])
        front = pareto_front(points)
        assert set(front) == _brute_front(points), points
        assert len(front) == len(set(front))
        xs = [points[i][0] for i in front]
        assert xs == sorted(xs)


def test_pareto_front_small_example():
    #            0        1        2        3        4 (= 1)   5
    points = [(1, 9), (2, 5), (3, 7), (4, 1), (2, 5), (2, 6)]
    assert pareto_front(points) == [0, 1, 4, 3]
    assert pareto_front([]) == [] and pareto_front([None]) == []


def test_error_records_prefers_output_error():
    layers = {"b.0.q": {"bits": 4, "output_error": 0.1, "weight_error": 0.5}, "b.0.k": {"weight_error": 0.2},
              "b.1.q": {"output_error": 0.3}}
    blocks = {"b.0": {"output_error": 0.05}, "b.1": {"other": 1}}
    assert error_records(layers, blocks) == {"metric": "output_error", "layers": {"b.0.q": 0.1, "b.1.q": 0.3},
                                             "blocks": {"b.0": 0.05}}
    assert error_records({"b.0.k": {"weight_error": 0.2}}) == {"metric": "weight_error", "layers": {"b.0.k": 0.2},
                                                               "blocks": {}}
    assert error_records({"b.0.q": {"bits": 4}}) is None and error_records(None) is None


KINDS = ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]


def _rows(with_tasks=True, with_errors=True) -> list[dict]:
    rows = []
    for name, size, ppl in [("base", 270e6, 20.0), ("w4", 95e6, 22.0), ("w3", 85e6, 40.0),
                            ("bad", 100e6, 60.0), ("m50", 270e6, 300.0)]:
        row = {"name": name, "size_bytes": size, "perplexity": ppl, "data": "austen:eval"}
        if with_tasks:
            row["tasks"] = {"lastword": {"metric": "acc", "value": 0.5 - ppl / 1000, "stderr": 0.01},
                            "nextsent": {"metric": "acc_norm", "value": 0.7 - ppl / 2000, "stderr": 0.02}}
        if with_errors and name != "base":
            layers = {f"model.layers.{b}.{kind}": (b + 1) * ppl / 1000 + j for b in range(12)
                      for j, kind in enumerate(KINDS)}
            row["errors"] = {"metric": "output_error", "layers": layers,
                             "blocks": {f"model.layers.{b}": ppl / 500 for b in range(12)}}
        rows.append(row)
    return rows


def test_size_perplexity_figure_marks_the_front():
    fig = size_perplexity_figure(_rows(), base="base")
    ax = fig.axes[0]
    line = next(line for line in ax.get_lines() if line.get_label() == "Pareto front")
    # the front, in ascending size: w3 (85 MB, 40), w4 (95 MB, 22), base (270 MB, 20)
    assert list(line.get_xdata()) == [85.0, 95.0, 270.0] and list(line.get_ydata()) == [40.0, 22.0, 20.0]
    assert ax.get_yscale() == "log"  # 20 .. 300 spans more than 4x
    assert {t.get_text() for t in ax.texts} == {"base", "w4", "w3", "bad", "m50"}
    assert size_perplexity_figure(_rows()[:1]) is None  # one point is no comparison


def test_size_accuracy_figure_has_a_panel_per_task_and_maximizes():
    fig = size_accuracy_figure(_rows(), base="base")
    assert [ax.get_title() for ax in fig.axes] == ["lastword", "nextsent"]
    assert fig.axes[1].get_ylabel() == "acc_norm"
    line = next(line for line in fig.axes[0].get_lines() if line.get_label() == "Pareto front")
    assert list(line.get_xdata()) == [85.0, 95.0, 270.0]  # higher accuracy is better: base beats w4 at 270 MB
    assert size_accuracy_figure(_rows(with_tasks=False)) is None


def test_layer_error_figure_orders_layers_by_block_then_record():
    rows = _rows()
    in_order = rows[1]["errors"]["layers"]
    # recorded with the blocks shuffled (layers.10 sorts after layers.9 only numerically), each block's linears
    # in execution order (q, k, down: not alphabetical)
    blocks = [11, 2, 10, 0, 9, 1, 3, 8, 4, 7, 5, 6]
    rows[1]["errors"]["layers"] = {f"model.layers.{b}.{k}": in_order[f"model.layers.{b}.{k}"]
                                   for b in blocks for k in KINDS}
    fig = layer_error_figure(rows)
    assert len(fig.axes) == 4  # one panel per model with records; the base has none
    heights = [b.get_height() for b in fig.axes[0].patches]
    assert heights == pytest.approx(list(in_order.values()))
    assert "worst: model.layers.11.mlp.down_proj" in fig.axes[0].get_title(loc="left")
    assert layer_error_figure(_rows(with_errors=False)) is None


def test_write_report_writes_valid_pngs_embedded_in_markdown(tmp_path):
    report = build_report(_rows(), base_name="base")
    json_path, md_path = write_report(report, tmp_path / "r")
    pngs = sorted(p.name for p in (tmp_path / "r").glob("*.png"))
    assert pngs == ["layer_errors.png", "size_vs_accuracy.png", "size_vs_perplexity.png"]
    md = md_path.read_text()
    for name in pngs:
        data = (tmp_path / "r" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
        assert f"]({name})" in md
    assert md.startswith(report_markdown(report).split("\n![")[0])  # the table and sections first, then the plots
    assert "| model | lastword (acc) | nextsent (acc_norm) |" in md and "0.4800 ± 0.0100" in md
    assert "- **m50** (output_error): `model.layers.11.mlp.down_proj`" in md
    assert json.loads(json_path.read_text()) == report
    assert not list((tmp_path / "r").glob(".*"))  # no temporary files left


def test_report_without_records_says_nothing_about_them(tmp_path):
    rows = [{k: v for k, v in r.items() if k in ("name", "size_bytes", "perplexity")} for r in _rows()]
    _, md_path = write_report(build_report(rows, base_name="base"), tmp_path / "r")
    md = md_path.read_text()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["report.json", "report.md", "size_vs_perplexity.png"]
    assert "error" not in md.lower() and "task" not in md.lower() and md.count("![") == 1


def test_without_matplotlib_writes_markdown_and_json_and_says_so(tmp_path, monkeypatch, caplog):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    report = build_report(_rows(), base_name="base")
    with caplog.at_level(logging.WARNING, logger="llmpress"):
        _, md_path = write_report(report, tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["report.json", "report.md"]
    assert "![" not in md_path.read_text()
    lines = [r.getMessage() for r in caplog.records if "pip install llmpress[report]" in r.getMessage()]
    assert len(lines) == 1


@pytest.mark.parametrize("count", [7, 12])
def test_many_models_get_distinct_styles(count):
    rows = [{"name": f"r{k}", "size_bytes": 1e6 * (k + 1), "perplexity": 10.0 + k % 3} for k in range(count)]
    ax = size_perplexity_figure(rows, base="r0").axes[0]
    styles = [(tuple(c.get_facecolor()[0]), c.get_paths()[0].vertices.tobytes()) for c in ax.collections[:count]]
    assert len(set(styles)) == count
    assert all(a != b for a, b in itertools.combinations(styles, 2))


def test_labels_of_crowded_points_are_placed(monkeypatch):
    """Labels pushed apart by exactly one gap: the rounding of (max + gap) - max once looped forever here."""
    import signal

    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("label placement did not finish"))
    signal.alarm(30)
    try:
        rows = [{"name": n, "size_bytes": s, "perplexity": p} for n, s, p in [
            ("base", 269030016, 34.93), ("magnitude-24", 176132736, 1362.4), ("magnitude-50", 177376896, 468.4),
            ("rtn-w3-g64", 99824256, 166.99), ("rtn-w4-g128", 111574656, 50.64), ("rtn-w4-g64", 113095296, 45.98),
            ("rtn-w4-g64-asym", 113924736, 42.98), ("rtn-w8", 163172736, 34.88)]]
        ax = size_perplexity_figure(rows, base="base").axes[0]
    finally:
        signal.alarm(0)
    ys = sorted(t.get_position()[1] for t in ax.texts if t.get_text().startswith("rtn-w4"))
    assert len(ys) == 3 and min(b - a for a, b in zip(ys, ys[1:])) >= 0.04  # pushed apart, in axes fraction

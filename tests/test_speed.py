"""Speed figures: median and range over repeats, a progress bar that --quiet silences, the busy-machine flag."""

from __future__ import annotations

import importlib
import statistics

import pytest

from llmpress.measure import build_report, report_markdown
from llmpress.measure.speed import BUSY_MARGIN, is_busy, speed
from llmpress.progress import silenced
from tiny_models import tiny_model

speed_module = importlib.import_module("llmpress.measure.speed")  # the package exports the function by that name


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_busy_rule():
    assert is_busy([2.0 + BUSY_MARGIN + 0.1, 1, 1], None, 2) is True
    assert is_busy([1.0, 9, 9], [2.0 + BUSY_MARGIN, 9, 9], 2) is False  # only the 1-minute average counts
    assert is_busy([1.0, 1, 1], [3.0, 1, 1], 2) is True  # before or after
    assert is_busy([5.0, 1, 1], [5.0, 1, 1], 8) is False
    assert is_busy(None, None, 2) is None


def _fake_load(monkeypatch, value, cpus=2):
    def getloadavg():
        if value is None:
            raise OSError("no load average here")
        return (value, value, value)

    monkeypatch.setattr(speed_module.os, "getloadavg", getloadavg)
    monkeypatch.setattr(speed_module, "available_cpus", lambda: cpus)


@pytest.mark.parametrize("load, busy", [(4.4, True), (1.2, False), (None, None)])
def test_speed_flags_a_busy_machine(llama, monkeypatch, load, busy):
    _fake_load(monkeypatch, load)
    result = speed(llama, prompt_len=8, new_tokens=2, repeats=1)
    assert result["busy"] is busy and result["cpus"] == 2
    assert result["load_before"] == (None if load is None else [load] * 3) == result["load_after"]


def test_speed_reports_median_and_range(llama):
    result = speed(llama, prompt_len=8, new_tokens=3, repeats=4)
    prefill, decode = result["prefill_latency_s_runs"], result["decode_tokens_per_s_runs"]
    assert len(prefill) == len(decode) == result["repeats"] == 4
    assert result["prefill_latency_s"] == statistics.median(prefill)
    assert result["decode_tokens_per_s"] == statistics.median(decode)
    assert (result["prefill_latency_s_min"], result["prefill_latency_s_max"]) == (min(prefill), max(prefill))
    assert (result["decode_tokens_per_s_min"], result["decode_tokens_per_s_max"]) == (min(decode), max(decode))
    assert result["prefill_tokens_per_s"] == pytest.approx(8 / result["prefill_latency_s"])


def test_speed_progress_bar_and_quiet(llama, capsys):
    speed(llama, prompt_len=8, new_tokens=2, repeats=2, progress=True)
    shown = capsys.readouterr().err
    assert "speed" in shown and "/8 " in shown  # warm-up (2 forwards) + 2 runs x (prefill + 2 decode steps)
    speed(llama, prompt_len=8, new_tokens=2, repeats=2)
    with silenced(True):  # what --quiet wraps every command in
        speed(llama, prompt_len=8, new_tokens=2, repeats=2, progress=True)
    assert capsys.readouterr().err == ""


def _row(name, busy, load=4.6):
    return {"name": name, "perplexity": 20.0, "speed": {
        "prefill_latency_s": 0.05, "prefill_latency_s_min": 0.04, "prefill_latency_s_max": 0.09,
        "decode_tokens_per_s": 30.0, "decode_tokens_per_s_min": 12.0, "decode_tokens_per_s_max": 31.0,
        "repeats": 5, "busy": busy, "cpus": 2, "load_before": [load - 0.2, 3.0, 2.0], "load_after": [load, 3.0, 2.0]}}


def test_report_marks_busy_speed_cells():
    text = report_markdown(build_report([_row("calm", False, 1.1), _row("loaded", True)], base_name="calm"))
    calm = next(line for line in text.splitlines() if line.startswith("| calm |"))
    loaded = next(line for line in text.splitlines() if line.startswith("| loaded |"))
    assert "| 50.0 (40.0–90.0) | 30.0 (12.0–31.0) |" in calm and "†" not in calm
    assert "| 50.0 (40.0–90.0)† | 30.0 (12.0–31.0)† |" in loaded
    assert "median of 5 runs" in text
    busy_notes = [line for line in text.splitlines() if "busy" in line]
    assert len(busy_notes) == 1 and "**loaded** (load 4.6 on 2 cores)" in busy_notes[0] and "calm" not in busy_notes[0]


def test_report_without_busy_rows_has_no_busy_note():
    text = report_markdown(build_report([_row("calm", False, 1.1)], base_name="calm"))
    assert "busy" not in text and "†" not in text
    old_style = {"name": "old", "speed": {"prefill_latency_s": 0.0123, "decode_tokens_per_s": 55.5}}
    text = report_markdown(build_report([old_style], base_name="old"))  # a row from before repeats were kept
    assert "| 12.3 | 55.5 |" in text and "median" not in text

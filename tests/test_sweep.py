"""`llmpress sweep`: many recipes as independent trials, in a local process pool or as Ray tasks, one report.

The numbers must not depend on where a trial ran: two local workers, one in-process worker and a local
Ray instance give the same rows. A failing trial is reported and the sweep goes on."""

from __future__ import annotations

import json

import pytest

from llmpress.cli import main
from llmpress.sweep import Trial, run_trial, sweep
from tiny_models import TOKENIZER_TEXT, tiny_model, tiny_tokenizer

RECIPES = ["rtn-w8", "rtn-w4-g64", "rtn-w4-g64-asym", "rtn-w3-g64", "magnitude-50", "magnitude-24"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    tok = tiny_tokenizer()
    folder = root / "base"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    text = root / "text.txt"
    text.write_text(TOKENIZER_TEXT * 4)
    kw = {"data": f"text:{text}", "seq_len": 16, "max_windows": 2, "measure_speed": False}
    return str(folder), kw


def _figures(rows):
    """Each row's recipe-tagged figures, flat (pytest.approx compares flat mappings)."""
    return {f"{r['recipe']}:{k}": r[k] for r in rows for k in ("perplexity", "size_bytes", "bits_per_weight")}


@pytest.fixture(scope="module")
def two_workers(base):
    folder, kw = base
    return sweep(folder, RECIPES, evaluate_kwargs=kw, workers=2)


def test_two_local_workers_give_the_rows_of_direct_trials(base, two_workers):
    folder, kw = base
    assert [r["recipe"] for r in two_workers] == RECIPES and not any(r.get("error") for r in two_workers)
    direct = [run_trial(Trial(folder, recipe, kw)) for recipe in RECIPES[:2]]
    assert _figures(two_workers[:2]) == pytest.approx(_figures(direct), rel=1e-6)
    size = {r["recipe"]: r["size_bytes"] for r in two_workers}  # each trial ran its own recipe
    assert size["rtn-w8"] > size["rtn-w4-g64-asym"] > size["rtn-w4-g64"] > size["rtn-w3-g64"]


def test_ray_gives_the_same_rows(base, two_workers):
    ray = pytest.importorskip("ray")
    folder, kw = base
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = sweep(folder, RECIPES, evaluate_kwargs=kw, ray="local")
    finally:
        ray.shutdown()
    assert _figures(rows) == pytest.approx(_figures(two_workers), rel=1e-6)


def test_a_failed_trial_is_reported_and_the_sweep_goes_on(base, monkeypatch):
    from llmpress import api

    folder, kw = base
    real = api.compress

    def flaky(model, recipe, **k):
        if recipe == "magnitude-50":
            raise RuntimeError("out of memory (simulated)")
        return real(model, recipe, **k)

    monkeypatch.setattr(api, "compress", flaky)
    rows = sweep(folder, ["rtn-w8", "magnitude-50", "rtn-w4-g64"], evaluate_kwargs=kw, workers=1)
    assert [r.get("error") for r in rows] == [None, "RuntimeError: out of memory (simulated)", None]
    assert rows[2]["perplexity"] > 0


def test_cli_sweep_writes_one_report(base, tmp_path, capsys):
    folder, kw = base
    grid = tmp_path / "grid.yaml"
    grid.write_text("recipes: [magnitude-50, rtn-w4-g64]\n")
    report, out = tmp_path / "report", tmp_path / "r.json"
    code = main(["sweep", folder, "--recipes", "rtn-w8", "--grid", str(grid), "--workers", "2", "--data", kw["data"],
                 "--seq-len", "16", "--max-windows", "2", "--no-speed", "--quiet", "--report", str(report),
                 "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == [f"{folder} (base)", "rtn-w8", "magnitude-50", "rtn-w4-g64"]
    assert len({r["tokens"] for r in rows}) == 1  # the same windows for every trial
    assert (report / "size_vs_perplexity.png").exists() and "| rtn-w8 |" in (report / "report.md").read_text()


@pytest.mark.parametrize("argv, needle", [
    (["--recipes", "no-such-recipe"], "no-such-recipe"),
    (["--grid", "/nonexistent/grid.yaml"], "--grid /nonexistent/grid.yaml: cannot read it"),
    ([], "sweep needs recipes"),
    (["--recipes", "rtn-w8", "--workers", "0"], "--workers 0 must be at least 1"),
])
def test_cli_sweep_bad_input_is_one_line_and_writes_nothing(base, tmp_path, capsys, argv, needle):
    folder, kw = base
    _one_line_refusal(folder, kw, tmp_path, capsys, argv, needle)


def test_cli_sweep_refuses_a_device_its_trials_would_not_use(base, tmp_path, capsys, monkeypatch):
    from llmpress import api

    folder, kw = base
    monkeypatch.setattr(api, "resolve_device", lambda device: device)  # as on a machine that has the GPU
    _one_line_refusal(folder, kw, tmp_path, capsys, ["--recipes", "rtn-w8", "--device", "cuda"],
                      "sweep runs its trials on the CPU: drop --device cuda")


def _one_line_refusal(folder, kw, tmp_path, capsys, argv, needle):
    out = tmp_path / "r.json"
    code = main(["sweep", folder, *argv, "--data", kw["data"], "--seq-len", "16", "--max-windows", "1",
                 "--no-speed", "--quiet", "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()

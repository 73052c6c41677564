"""The real default model (SmolLM2-135M) on the real corpus: the figures of shared/assets.md.

Protocol: Persuasion, 16 consecutive 1024-token windows, no BOS. assets.md measured the
dequantized baseline at 33.53 with plain transformers and llm-compressor 0.14's RTN int4
symmetric group 64 at 45.00.
"""

import json

import pytest

from llmpress.cli import main

pytestmark = pytest.mark.real
WINDOWS = ["--data", "austen:eval", "--seq-len", "1024", "--max-windows", "16", "--no-speed", "--quiet"]


def _eval(model, path):
    assert main(["eval", str(model), *WINDOWS, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_baseline_and_rtn_reproduce_reference_figures(tmp_path):
    base = _eval("smollm2-135m", tmp_path / "base.json")
    assert base["perplexity"] == pytest.approx(33.53, rel=0.01)
    assert base["tokens"] == 16 * 1023
    out = tmp_path / "w4"
    assert main(["compress", "smollm2-135m", "--recipe", "rtn-w4-g64", "--out", str(out), "--quiet"]) == 0
    w4 = _eval(out, tmp_path / "w4.json")
    assert w4["perplexity"] == pytest.approx(45.00, rel=0.02)
    assert w4["linear_bits_per_weight"] == pytest.approx(4.25)
    assert w4["compression_ratio"] > 2


def test_demo_prints_the_table(capsys):
    argv = ["demo", "--seq-len", "256", "--max-windows", "2", "--no-speed", "--quiet"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for name in ("smollm2-135m (base)", "rtn-w4-g64", "rtn-w4-g64-asym", "magnitude-50"):
        assert f"| {name} |" in table

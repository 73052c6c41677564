"""evaluate(): the stable JSON interface, base vs compressed on the same windows, on a tiny model."""

import json
import math

import pytest
import torch

from llmpress import compress, evaluate
from llmpress.cli import main
from llmpress.measure import perplexity
from tiny_models import TOKENIZER_TEXT, tiny_model, tiny_tokenizer

STABLE_KEYS = {"perplexity", "params", "size_bytes", "bits_per_weight", "compression_ratio"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), hidden_size=128, intermediate_size=256, head_dim=32)
    base = root / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    text = root / "text.txt"
    text.write_text(TOKENIZER_TEXT * 4)
    return root, base, f"text:{text}", tok


def test_evaluate_matches_direct_perplexity(setup):
    root, base, data, tok = setup
    report = evaluate(str(base), data, seq_len=32, max_windows=3, measure_speed=False)
    assert STABLE_KEYS <= set(report)
    ids = tok(open(data[5:]).read(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    windows = ids[: 3 * 32].reshape(3, 32)
    from llmpress.models.loader import load_model

    direct = perplexity(load_model(base).model, windows)
    assert report["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert report["tokens"] == 3 * 31 and report["windows"] == 3
    assert report["compression_ratio"] == pytest.approx(1.0) and report["bits_per_weight"] == pytest.approx(16.0)


def test_compressed_is_smaller_and_measured_on_same_windows(setup, tmp_path):
    root, base, data, tok = setup
    out = tmp_path / "w4"
    compress(str(base), "rtn-w4-g64", out=out)
    b = evaluate(str(base), data, seq_len=32, max_windows=3, measure_speed=False)
    c = evaluate(str(out), data, seq_len=32, max_windows=3, measure_speed=False)
    assert c["tokens"] == b["tokens"]
    assert c["perplexity"] != b["perplexity"] and math.isfinite(c["perplexity"])
    # 4 bits + an fp16 scale per 64 weights on the block linears
    assert c["linear_bits_per_weight"] == pytest.approx(4 + 16 / 64)
    assert c["size_bytes"] < b["size_bytes"] and c["compression_ratio"] > 1.5
    assert c["disk_bytes"] > 0 and c["params"]["total"] == b["params"]["total"]


def test_cli_eval_json_and_side_by_side(setup, tmp_path, capsys):
    root, base, data, tok = setup
    out = tmp_path / "m50"
    assert main(["compress", str(base), "--recipe", "magnitude-50", "--out", str(out), "--quiet"]) == 0
    single = tmp_path / "single.json"
    assert main(["eval", str(out), "--data", data, "--seq-len", "32", "--max-windows", "2", "--no-speed",
                 "--quiet", "--json", str(single)]) == 0
    obj = json.loads(single.read_text())
    assert STABLE_KEYS <= set(obj) and isinstance(obj["perplexity"], float)
    assert obj["params"]["nonzero"] < obj["params"]["total"]
    both = tmp_path / "both"
    assert main(["eval", str(out), "--base", str(base), "--data", data, "--seq-len", "32", "--max-windows", "2",
                 "--no-speed", "--quiet", "--report", str(both)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((both / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == [f"{base} (base)", str(out)]
    delta = report["rows"][1]["delta_perplexity_pct"]
    ppls = [r["perplexity"] for r in report["rows"]]
    assert delta == pytest.approx(100 * (ppls[1] - ppls[0]) / ppls[0])
    assert "| model | ppl |" in printed and (both / "report.md").read_text().startswith("| model |")


def test_speed_is_measured(setup):
    root, base, data, tok = setup
    report = evaluate(str(base), data, seq_len=32, max_windows=1)
    assert report["speed"]["decode_tokens_per_s"] > 0 and report["speed"]["prefill_latency_s"] > 0
    assert torch.get_num_threads() == report["speed"]["threads"]


def test_cli_kv_bits_quantizes_the_cache(setup, tmp_path):
    root, base, data, tok = setup
    common = [str(base), "--data", data, "--seq-len", "32", "--max-windows", "2", "--no-speed", "--quiet"]
    plain, kv4 = tmp_path / "plain.json", tmp_path / "kv4.json"
    assert main(["eval", *common, "--json", str(plain)]) == 0
    assert main(["eval", *common, "--kv-bits", "4", "--json", str(kv4)]) == 0
    a, b = json.loads(plain.read_text()), json.loads(kv4.read_text())
    assert "kv_cache" not in a and b["kv_cache"]["bits"] == 4
    assert b["perplexity"] != a["perplexity"] and b["tokens"] == a["tokens"]


def test_model_level_stages_run_in_order_between_block_segments(setup, monkeypatch):
    """A "model" method sees the whole model once, after the block stages before it and before those after it."""
    from llmpress.quant.rtn import RTNConfig
    from llmpress.registry import Method, methods

    calls = []

    def whole_model(model, arch, samples, cfg, *, device, batch_size, progress):
        weight = model.model.layers[0].self_attn.q_proj.weight
        calls.append((samples is None, weight.unique().numel()))
        return {"model.layers.0.self_attn.q_proj": {"whole": True}}

    monkeypatch.setitem(methods(), "whole", Method("whole", RTNConfig, whole_model, (), "model", calibrated=False))
    _root, base, _data, tok = setup
    model = tiny_model("llama", vocab_size=len(tok), hidden_size=128, intermediate_size=256, head_dim=32)
    recipe = {"stages": [{"method": "rtn", "args": {"bits": 2, "group_size": -1}}, {"method": "whole"},
                         {"method": "rtn", "args": {"bits": 8, "group_size": -1}}]}
    result = compress(model, recipe, tokenizer=tok)
    # it ran once, with no calibration samples, after the 2-bit stage (at most 4 levels per row x rows)
    assert len(calls) == 1 and calls[0][0]
    assert calls[0][1] <= 4 * model.model.layers[0].self_attn.q_proj.weight.shape[0]
    meta = result.layers["model.layers.0.self_attn.q_proj"]
    assert meta["whole"] is True and meta["bits"] == 8

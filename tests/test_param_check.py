"""The benchmarks' same-job check (benchmarks/peers/param_check.py): which parameters a run changed."""

import importlib.util
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llmpress
from tiny_models import tiny_model

_SPEC = importlib.util.spec_from_file_location(
    "param_check", Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "param_check.py")
param_check = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(param_check)


def _tied_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                        tie_word_embeddings=True)).eval()


def test_pruning_a_tied_head_shows_as_changed_embeddings():
    model = _tied_llama()
    before = param_check.snapshot(model)
    with torch.no_grad():
        model.lm_head.weight[:, :16] = 0  # what a peer pruning lm_head does to a tied model
        model.model.layers[0].mlp.up_proj.weight[:, :8] = 0
    got = param_check.changes(before, model)
    assert got["touched"] == ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    assert got["zeros_added"] == {"model.embed_tokens.weight": 64 * 16, "model.layers.0.mlp.up_proj.weight": 64 * 8}


def test_quantization_scale_or_replacement_counts_as_changed():
    model = _tied_llama()
    before = param_check.snapshot(model)
    proj = model.model.layers[0].self_attn.q_proj
    proj.register_buffer("weight_scale", torch.ones(proj.out_features, 1))  # fake-quant: weight kept, scale added
    got = param_check.changes(before, model, also=("model.layers.0.mlp.down_proj.weight",))
    assert got["touched"] == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert got["zeros_added"] == {}


def test_difference_names_the_parameters():
    ours = {"touched": ["a.weight", "b.weight"], "zeros_added": {"a.weight": 3}}
    assert param_check.difference(ours, dict(ours)) is None
    peer = {"touched": ["a.weight", "b.weight", "model.embed_tokens.weight"], "zeros_added": {"a.weight": 3}}
    reason = param_check.difference(ours, peer)
    assert "only the peer model.embed_tokens.weight" in reason and "only llmpress none" in reason
    peer = {"touched": ours["touched"], "zeros_added": {"a.weight": 3, "b.weight": 1}}
    assert "gained zeros in" in param_check.difference(ours, peer)


def test_llmpress_pruning_changes_only_block_linears(calib):
    tok, spec = calib
    model = tiny_model("llama", vocab_size=len(tok))
    before = param_check.snapshot(model)
    result = llmpress.compress(model, "wanda-50", tokenizer=tok, data=spec, samples=2, seq_len=16)
    got = param_check.changes(before, result.model)
    linears = {f"{name}.weight" for name in result.layers}
    assert set(got["touched"]) == linears == set(got["zeros_added"])
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in got["touched"])


def test_benchmark_refuses_unequal_jobs(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _common import check_same_job

    ours = {"touched": ["a.weight"], "zeros_added": {"a.weight": 5}}
    prune, quant = {"kind": "wanda", "sparsity": 0.5}, {"kind": "rtn", "bits": 4}
    same = {**ours, "perplexity": 50.0, "error": None}
    row = {**ours, "peer": dict(same)}
    check_same_job(row, prune)
    assert row["peer"] == same  # the same job: the side by side stands
    head = {"touched": ["a.weight", "model.embed_tokens.weight"], "zeros_added": {"a.weight": 5},
            "perplexity": 87.4, "error": None}
    row = {**ours, "peer": dict(head)}
    check_same_job(row, prune)
    assert row["peer"]["refused"] and "model.embed_tokens.weight" in row["peer"]["error"]
    assert "perplexity" not in row["peer"]  # no figure to print
    rounded = {"touched": ["a.weight"], "zeros_added": {}, "perplexity": 45.0, "error": None}
    row = {**ours, "peer": dict(rounded)}
    check_same_job(row, quant)  # rounding to zero is not pruning: quantization compares what changed
    assert row["peer"] == rounded
    row = {**ours, "peer": dict(rounded)}
    check_same_job(row, prune)
    assert row["peer"]["refused"] and "gained zeros in" in row["peer"]["error"]

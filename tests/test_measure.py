"""Tests for llmpress.measure: every number checked against a hand or reference count."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    Phi3Config,
)

from llmpress.errors import LlmpressError
from llmpress.measure import (
    PeakMemory,
    build_report,
    count_params,
    flops_per_token,
    perplexity,
    report_markdown,
    size_report,
    speed,
    write_report,
)

H, LAYERS, HEADS, KV, HEAD_DIM, INTER, VOCAB = 64, 2, 4, 2, 16, 128, 256


def tiny_llama(tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
        intermediate_size=INTER, vocab_size=VOCAB, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- perplexity


def test_perplexity_matches_cross_entropy_reference(llama, windows):
    result = perplexity(llama, windows)
    with torch.no_grad():
        logits = llama(windows).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).double(), windows[:, 1:].reshape(-1)).item()
    assert result["loss"] == pytest.approx(ref, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(ref), rel=1e-6)
    assert (result["tokens"], result["windows"], result["seq_len"]) == (3 * 23, 3, 24)


def test_perplexity_single_window_matches_hf_labels_loss(llama, windows):
    one = windows[:1]
    with torch.no_grad():
        hf_loss = llama(one, labels=one).loss.item()
    assert perplexity(llama, one)["perplexity"] == pytest.approx(math.exp(hf_loss), rel=1e-5)


def test_perplexity_batch_size_does_not_change_result(llama, windows):
    a = perplexity(llama, windows, batch_size=1)
    b = perplexity(llama, windows, batch_size=2, progress=True)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["tokens"] == b["tokens"]


def test_uniform_logits_give_vocab_size_perplexity(windows):
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert perplexity(model, windows)["perplexity"] == pytest.approx(VOCAB, rel=1e-6)


@pytest.mark.parametrize(
    "bad", [torch.zeros(5, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 4)]
)
def test_perplexity_rejects_bad_windows(llama, bad):
    with pytest.raises(LlmpressError):
        perplexity(llama, bad)


# ---------------------------------------------------------------- size

# Tiny Llama parameters by hand: embedding 256*64; per layer q 64*64, k 32*64, v 32*64,
# o 64*64, gate/up/down 128*64 each, 2 RMSNorm of 64; a final norm of 64.
EMB = VOCAB * H
PER_LAYER = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 128 * 64 + 2 * 64
TOTAL_TIED = EMB + LAYERS * PER_LAYER + 64  # = 90432


def test_count_params_tied_embeddings_counted_once():
    tied, untied = tiny_llama(tied=True), tiny_llama(tied=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    counts = count_params(tied)
    assert counts["total"] == TOTAL_TIED == 90432
    assert counts["embedding"] == EMB
    assert counts["linear"] == LAYERS * (PER_LAYER - 128)
    assert counts["other"] == LAYERS * 128 + 64
    assert counts["nonzero"] == counts["total"] - int((tied.model.norm.weight == 0).sum())  # random init: no zeros
    assert count_params(untied)["total"] == TOTAL_TIED + EMB


def test_count_params_nonzero_sees_pruning():
    model = tiny_llama(tied=True)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, :32] = 0
    assert count_params(model)["nonzero"] == TOTAL_TIED - 128 * 32


FAKE_LAYERS = {
    # 4-bit, group 64, symmetric: 64*64*4/8 packed + 64 rows * 1 group * 2 B scales
    "model.layers.0.self_attn.q_proj": {"shape": [64, 64], "bits": 4, "group_size": 64, "sym": True,
                                        "sparsity": 0, "n:m": None},
    # 4-bit, group 32, asymmetric: 32*64/2 + 32*2 groups * 2 B + 32*2 zero points * 4 bit / 8
    "model.layers.0.self_attn.k_proj": {"shape": [32, 64], "bits": 4, "group_size": 32, "sym": False,
                                        "sparsity": 0, "n:m": None},
    # 8-bit per-channel symmetric: 128*64 + 128 scales * 2 B
    "model.layers.0.mlp.gate_proj": {"shape": [128, 64], "bits": 8, "group_size": None, "sym": True,
                                     "sparsity": 0, "n:m": None},
    # 50 % unstructured sparse, not quantized: bitmask 128*64/8 + 4096 values * 2 B + 128 int64 row offsets
    "model.layers.0.mlp.up_proj": {"shape": [128, 64], "bits": None, "group_size": None, "sym": True,
                                   "sparsity": 0.5, "n:m": None},
    # 2:4: 8192/2 kept values * 2 B + bitmask 64*128/8
    "model.layers.1.mlp.down_proj": {"shape": [64, 128], "bits": None, "group_size": None, "sym": True,
                                     "sparsity": 0.5, "n:m": [2, 4]},
    # 50 % sparse and 4-bit g64 sym: stored pack-quantized, zeros included: 8192 * 4/8 + 128 scales * 2 B
    "model.layers.1.mlp.up_proj": {"shape": [128, 64], "bits": 4, "group_size": 64, "sym": True,
                                   "sparsity": 0.5, "n:m": None},
    # 4:8 is saved sparse-bitmask: 4096 kept values * 2 B + bitmask 128*64/8 + 128 int64 row offsets
    "model.layers.1.mlp.gate_proj": {"shape": [128, 64], "bits": None, "group_size": None, "sym": True,
                                     "sparsity": 0.5, "n:m": [4, 8]},
}
LAYER_BYTES = [
    64 * 64 * 4 // 8 + 64 * 2,
    32 * 64 * 4 // 8 + 32 * 2 * 2 + 32 * 2 * 4 // 8,
    128 * 64 + 128 * 2,
    128 * 64 // 8 + 4096 * 2 + 128 * 8,
    4096 * 2 + 64 * 128 // 8,
    8192 * 4 // 8 + 128 * 2,
    4096 * 2 + 128 * 64 // 8 + 128 * 8,
]
LISTED_NUMEL = 64 * 64 + 32 * 64 + 4 * 128 * 64 + 64 * 128


def test_size_report_hand_counted_bytes(tmp_path):
    model = tiny_llama(tied=True)
    assert LAYER_BYTES == [2176, 1184, 8448, 10240, 9216, 4352, 10240]
    report = size_report(model, FAKE_LAYERS)
    dense_rest = (TOTAL_TIED - LISTED_NUMEL) * 2
    assert report["size_bytes"] == dense_rest + sum(LAYER_BYTES) == 132512
    assert report["dense_bytes"] == TOTAL_TIED * 2
    assert report["compression_ratio"] == pytest.approx(report["dense_bytes"] / report["size_bytes"])
    assert report["bits_per_weight"] == pytest.approx(8 * 132512 / TOTAL_TIED)
    assert report["linear_bits_per_weight"] == pytest.approx(8 * sum(LAYER_BYTES) / LISTED_NUMEL)
    assert report["disk_bytes"] is None
    assert report["params"]["total"] == TOTAL_TIED


def test_size_report_without_layers_is_dense(tmp_path):
    model = tiny_llama(tied=False)
    report = size_report(model, dense_bits=32)
    assert report["size_bytes"] == report["dense_bytes"] == (TOTAL_TIED + EMB) * 4
    assert report["compression_ratio"] == 1.0
    assert report["linear_bits_per_weight"] is None


def test_size_report_disk_bytes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub" / "b.json").write_bytes(b"y" * 234)
    assert size_report(tiny_llama(), folder=tmp_path)["disk_bytes"] == 1234
    with pytest.raises(LlmpressError):
        size_report(tiny_llama(), folder=tmp_path / "missing")


def test_size_report_rejects_unknown_layer_and_bad_bits():
    model = tiny_llama()
    with pytest.raises(LlmpressError):
        size_report(model, {"model.layers.9.mlp.up_proj": {"bits": 4}})
    with pytest.raises(LlmpressError):
        size_report(model, {"model.layers.0.mlp.up_proj": {"bits": 0}})


# ---------------------------------------------------------------- flops

SEQ = 32
# Per layer: 2 FLOPs x (q 64*64 + k 32*64 + v 32*64 + o 64*64 + gate/up/down 3*128*64) = 73728.
LINEAR_FLOPS = LAYERS * 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 128 * 64)
LM_HEAD_FLOPS = 2 * VOCAB * H
# Per layer: QK^T and AV, 2 FLOPs per MAC, heads * head_dim * average causal context SEQ/2.
ATTN_FLOPS = LAYERS * 2 * 2 * HEADS * HEAD_DIM * (SEQ // 2)


def test_flops_hand_count_config_and_model(llama):
    expected = {
        "flops_per_token": LINEAR_FLOPS + LM_HEAD_FLOPS + ATTN_FLOPS, "linear": LINEAR_FLOPS,
        "attention": ATTN_FLOPS, "lm_head": LM_HEAD_FLOPS,
        "sparse_flops_per_token": LINEAR_FLOPS + LM_HEAD_FLOPS + ATTN_FLOPS, "seq_len": SEQ,
    }  # fmt: skip
    assert expected["flops_per_token"] == 188416
    assert flops_per_token(llama.config, SEQ) == expected
    assert flops_per_token(llama.config, SEQ, model=llama) == expected


def test_flops_follow_smaller_and_factorized_linears():
    model = tiny_llama()
    base = flops_per_token(model.config, SEQ, model=model)["flops_per_token"]
    attn = model.model.layers[0].self_attn
    attn.o_proj = nn.Linear(64, 64, bias=False)  # unchanged shape: same count
    assert flops_per_token(model.config, SEQ, model=model)["flops_per_token"] == base
    model.model.layers[0].mlp.down_proj = nn.Linear(96, 64, bias=False)  # pruned 128 -> 96 inputs
    pruned = flops_per_token(model.config, SEQ, model=model)["flops_per_token"]
    assert pruned == base - 2 * 32 * 64
    attn.q_proj = nn.Sequential(nn.Linear(64, 8, bias=False), nn.Linear(8, 64, bias=False))  # rank 8
    lowrank = flops_per_token(model.config, SEQ, model=model)["flops_per_token"]
    assert lowrank == pruned - 2 * 64 * 64 + 2 * (64 * 8 + 8 * 64)


def test_sparse_flops_discount_zeros_only():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[:64] = 0  # half of 128x64
    result = flops_per_token(model.config, SEQ, model=model)
    assert result["flops_per_token"] == 188416
    assert result["sparse_flops_per_token"] == 188416 - 2 * 64 * 64
    layers = {"model.layers.0.mlp.up_proj": {"shape": [128, 64], "sparsity": 0.5}}
    from_config = flops_per_token(model.config, SEQ, layers=layers)
    assert from_config["sparse_flops_per_token"] == 188416 - 2 * 64 * 64
    with_nm = {**layers, "model.layers.1.mlp.gate_proj": {"n:m": [2, 4]}}
    with_model = flops_per_token(model.config, SEQ, layers=with_nm, model=model)
    assert with_model["sparse_flops_per_token"] == 188416 - 2 * 64 * 64 - 2 * 64 * 64


def _tiny(config_cls, **kw):
    return AutoModelForCausalLM.from_config(config_cls(**kw))


@pytest.mark.parametrize(
    "model_fn",
    [
        lambda: _tiny(GPT2Config, n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64),
        lambda: _tiny(GPTNeoXConfig, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=256, vocab_size=256),
        lambda: _tiny(OPTConfig, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                      vocab_size=256, word_embed_proj_dim=64),
        lambda: _tiny(Phi3Config, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=256, pad_token_id=0),
        lambda: _tiny(Gemma3TextConfig, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=256),
    ],
    ids=["gpt2", "gpt_neox", "opt", "phi3", "gemma3"],
)
def test_flops_config_route_matches_model_route(model_fn):
    model = model_fn()
    from_model = flops_per_token(model.config, SEQ, model=model)
    from_config = flops_per_token(model.config, SEQ)
    assert from_config == from_model
    assert from_model["linear"] > 0 and from_model["lm_head"] == 2 * 256 * 64


def test_flops_sliding_window_caps_attention_context():
    config = Gemma3TextConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    window_ctx = (8 * 8 / 2 + (SEQ - 8) * 8) / SEQ  # mean of min(t, 8) over a causal sequence
    expected = 2 * 2 * 4 * 16 * (window_ctx + SEQ / 2)
    assert flops_per_token(config, SEQ)["attention"] == round(expected)


# ---------------------------------------------------------------- speed and memory


def test_speed_returns_positive_finite_numbers(llama):
    result = speed(llama, prompt_len=16, new_tokens=4, repeats=2)
    for key in ("prefill_latency_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert math.isfinite(result[key]) and result[key] > 0
    assert (result["prompt_len"], result["new_tokens"], result["device"]) == (16, 4, "cpu")
    assert result["threads"] == torch.get_num_threads()


def test_peak_memory_sees_transient_allocation():
    with PeakMemory() as mem:
        big = torch.ones(50 * 1024 * 1024, dtype=torch.float32)  # 200 MiB, touched by the fill
        time.sleep(0.1)
        del big
    assert mem.delta_bytes >= 150 * 1024 * 1024
    assert mem.peak_bytes >= mem.start_bytes + mem.delta_bytes
    assert mem._thread is None


def test_peak_memory_stops_thread_on_exception():
    mem = PeakMemory()
    with pytest.raises(RuntimeError):
        with mem:
            raise RuntimeError("boom")
    assert mem._thread is None and mem.peak_bytes > 0


# ---------------------------------------------------------------- report


def _rows() -> list[dict]:
    return [
        {"name": "base", "perplexity": 20.0, "size_bytes": 2_000_000, "compression_ratio": 1.0,
         "bits_per_weight": 16.0, "params": {"total": 1_000_000, "nonzero": 1_000_000}},
        {"name": "w4-g64", "perplexity": 21.5, "flops_per_token": 2_500_000,
         "speed": {"prefill_latency_s": 0.0123, "decode_tokens_per_s": 55.5}, "peak_memory_bytes": 300_000_000,
         "compress_time_s": 12.3, "notes": "GPTQ"},
        {"name": "pruned|50", "perplexity": 18.0},
    ]  # fmt: skip


def test_build_report_delta_perplexity():
    rows = _rows()
    report = build_report(rows, base_name="base")
    deltas = [row["delta_perplexity_pct"] for row in report["rows"]]
    assert deltas[0] is None
    assert deltas[1] == pytest.approx(7.5)
    assert deltas[2] == pytest.approx(-10.0)
    assert report["base"] == "base" and report["columns"][0] == "model"
    assert "delta_perplexity_pct" not in rows[1]  # input untouched
    with pytest.raises(LlmpressError):
        build_report(rows, base_name="nope")


def test_report_markdown_table():
    text = report_markdown(build_report(_rows()))
    lines = text.splitlines()
    assert lines[0].startswith("| model | ppl | Δppl % | params (nonzero) |") and "compress s" in lines[0]
    assert "| base | 20.00 | – |" in text
    assert "| w4-g64 | 21.50 | +7.50 |" in text and "pruned\\|50" in text
    assert "12.3 |" in text and "55.5" in text and "2.00 | 1.00×" in text
    assert lines[2].count("|") == lines[0].count("|")
    assert "- **w4-g64**: GPTQ" in text
    shared = [dict(r, notes=["same for all"]) for r in _rows()]
    assert "\n- same for all\n" in report_markdown(build_report(shared))


def test_write_report_round_trips(tmp_path):
    report = build_report(_rows())
    json_path, md_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text()) == report
    assert md_path.read_text() == report_markdown(report)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md"]

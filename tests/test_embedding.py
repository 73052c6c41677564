"""Quantization of the (tied) embedding: the quantizer against a plain reference, the stage on a tied model, eval's
size count, the compressed-tensors round trip, its sensitivity against a direct computation, and ``llmpress auto``
under a byte budget below what a dense embedding allows."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import llmpress
from llmpress.auto import auto
from llmpress.cli import main
from llmpress.errors import LlmpressError
from llmpress.export import formats
from llmpress.measure.size import layer_bytes, size_report
from llmpress.quant.embedding import EmbeddingConfig, QuantizedEmbedding, quantize_embedding
from llmpress.recipe import load_recipe
from llmpress.sensitivity import embedding_candidates, embedding_sensitivity
from reference.embedding_reference import embedding_reference
from tiny_models import TOKENIZER_TEXT, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = tiny_tokenizer()
    text = tmp_path_factory.mktemp("embedding") / "calib.txt"
    text.write_text(TOKENIZER_TEXT * 3)
    ids = llmpress.data.calibration_samples(tok, f"text:{text}", 8, 32, 0)
    return tok, f"text:{text}", ids


def _tied(tok):
    model = tiny_model("llama", vocab_size=len(tok), tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (3, 24, True), (4, 24, False), (8, -1, True),
                                            (2, 64, False)])
def test_quantizer_equals_the_plain_reference(bits, group, sym):
    torch.manual_seed(0)
    W = torch.randn(40, 64) * torch.rand(40, 1)  # rows of different ranges; group 24 leaves a partial last group
    W[3] = 0.0  # an all-zero row: scale 1
    result = quantize_embedding(W, EmbeddingConfig(bits=bits, group_size=group, sym=sym))
    codes, scale, zero, dequantized = embedding_reference(W, bits, group, sym)
    assert torch.equal(result.qweight, codes) and torch.equal(result.scale, scale)
    assert torch.equal(result.zero, zero) and torch.equal(result.weight, dequantized)
    assert result.record() == {"method": "embedding", "bits": bits, "group_size": group, "sym": sym}
    if bits == 8:
        assert (result.weight - W).abs().max() <= scale.max() / 2 + 1e-7  # within half a step
    with pytest.raises(LlmpressError, match="bits=9"):
        EmbeddingConfig(bits=9)


def test_the_stage_quantizes_the_shared_matrix_for_lookup_and_head(tiny):
    tok, _data, _ids = tiny
    model = _tied(tok)
    W = model.model.embed_tokens.weight.detach().clone()
    result = llmpress.compress(model, "embed-w4-g64")
    expected = quantize_embedding(W, EmbeddingConfig(bits=4, group_size=64)).weight
    assert torch.equal(model.model.embed_tokens.weight, expected)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert result.layers == {"model.embed_tokens": {"method": "embedding", "bits": 4, "group_size": 64, "sym": True,
                                                    "shape": list(W.shape), "tied": True}}
    assert torch.equal(result.results["model.embed_tokens"].qweight,
                       quantize_embedding(W, EmbeddingConfig(bits=4, group_size=64)).qweight)
    ids = torch.randint(0, len(tok), (1, 12))
    with torch.no_grad():  # both uses see the quantized matrix: the lookup, and the logits of the last hidden state
        hidden = model.model(ids).last_hidden_state
        torch.testing.assert_close(model(ids).logits, hidden @ expected.T)
        torch.testing.assert_close(model.model.embed_tokens(ids), expected[ids])


def test_size_counts_the_embedding_as_stored_and_keeps_the_linears_bits(tiny):
    tok, data, _ids = tiny
    model = _tied(tok)
    recipe = load_recipe({"stages": [{"method": "embedding", "args": {"bits": 4, "group_size": 32}},
                                     {"method": "rtn", "args": {"bits": 3, "group_size": 32}}]})
    linears_only = llmpress.compress(_tied(tok), "rtn-w4-g64")
    result = llmpress.compress(model, recipe, tokenizer=tok)
    size = size_report(result.model, result.layers)
    vocab, hidden = model.model.embed_tokens.weight.shape
    embedding = vocab * hidden * 4 // 8 + vocab * (hidden // 32) * 2  # 4-bit codes + one fp16 scale per 32
    linear = sum(layer_bytes(m) for n, m in result.layers.items() if n != "model.embed_tokens")
    params = size["params"]
    rest = (params["total"] - params["linear"] - vocab * hidden) * 2  # norms at 16 bits; the head is the embedding
    assert size["size_bytes"] == rest + linear + embedding
    assert size["embedding_bits_per_weight"] == pytest.approx(4 + 16 / 32)
    assert size["linear_bits_per_weight"] == pytest.approx(3 + 16 / 32)  # over the block linears only, as before
    assert size_report(linears_only.model, linears_only.layers)["embedding_bits_per_weight"] is None
    report = llmpress.evaluate(result, data, seq_len=32, max_windows=2, measure_speed=False)
    assert report["size_bytes"] == size["size_bytes"] and report["embedding_bits_per_weight"] == pytest.approx(4.5)


@pytest.mark.parametrize("tied,linears", [(True, True), (False, True), (True, False)])
def test_compressed_tensors_stores_the_codes_and_reloads_exactly(tiny, tmp_path, tied, linears):
    tok, data, _ids = tiny
    model = _tied(tok) if tied else tiny_model("llama", vocab_size=len(tok))
    stages = [{"method": "embedding", "args": {"bits": 4, "group_size": 32, "sym": False}},
              {"method": "rtn", "args": {"bits": 4, "group_size": 32}}]
    recipe = load_recipe({"stages": stages if linears else stages[:1]})  # the embedding alone: one config group
    result = llmpress.compress(model, recipe, tokenizer=tok, out=tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    assert "model.embed_tokens.weight" not in tensors and "model.embed_tokens.weight_packed" in tensors
    assert ("lm_head.weight" in tensors) == (not tied)  # a tied head is the embedding's codes
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["embedding"]["targets"] == ["model.embed_tokens"]
    assert formats.readers(tmp_path / "q") == ["llmpress"]  # transformers and vLLM pack linears only
    loaded = llmpress.load_model(tmp_path / "q")
    for name, param in result.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], param), name
    assert (loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight) == tied
    again = llmpress.evaluate(tmp_path / "q", data, seq_len=32, max_windows=2, measure_speed=False)
    memory = llmpress.evaluate(result, data, seq_len=32, max_windows=2, measure_speed=False)
    assert again["perplexity"] == pytest.approx(memory["perplexity"], rel=1e-5)
    assert again["size_bytes"] == memory["size_bytes"] < size_report(tiny_model("llama", vocab_size=len(tok)))[
        "size_bytes"]
    module = QuantizedEmbedding.from_compressed(model.model.embed_tokens, result.results["model.embed_tokens"],
                                                result.results["model.embed_tokens"].grid)
    ids = torch.randint(0, len(tok), (2, 5))
    assert torch.equal(module(ids), model.model.embed_tokens(ids))


def test_embedding_sensitivity_is_the_fisher_weighted_error_of_both_uses(tiny):
    tok, _data, ids = tiny
    model = _tied(tok)
    cands = embedding_candidates([2, 4, 8], [32])
    sens = embedding_sensitivity(model, ids, 4, cands)
    assert sens.layer == "model.embed_tokens" and sens.tied and [c.label for c in cands][:2] == ["dense",
                                                                                                  "embedding-w2-g32"]
    # by hand: the gradients of the summed token NLL at the looked-up vectors and at the logits, in float64
    W = model.model.embed_tokens.weight.detach()
    seen = {}
    h = model.lm_head.register_forward_pre_hook(lambda _m, args: seen.__setitem__("h", args[0]))
    model.requires_grad_(False)
    emb = W[ids[:4]].clone().requires_grad_(True)
    out = model(inputs_embeds=emb)
    h.remove()
    logits = out.logits
    logits.retain_grad()
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:4, 1:].reshape(-1),
                                      reduction="sum").backward()
    model.requires_grad_(True)
    tokens = ids[:4].numel()
    F_e = emb.grad.double().pow(2).reshape(-1, W.shape[1]).sum(0) / tokens
    F_z = logits.grad.double().pow(2).reshape(-1, W.shape[0]).sum(0) / tokens
    X = seen["h"].detach().double().reshape(-1, W.shape[1])
    freq = torch.bincount(ids.reshape(-1), minlength=W.shape[0]).double() / ids.numel()
    dW = quantize_embedding(W, cands[2].config).weight.double() - W.double()
    lookup = 0.5 * float(((freq @ dW.pow(2)) * F_e).sum())
    head = 0.5 * float((F_z * (X @ dW.T).pow(2).mean(0)).sum())
    assert sens.lookup[2] == pytest.approx(lookup, rel=1e-3) and sens.head[2] == pytest.approx(head, rel=1e-3)
    assert sens.cost[2] == pytest.approx(lookup + head, rel=1e-3) and sens.cost[0] == 0
    assert sens.cost[1] > sens.cost[2] > sens.cost[3] > 0  # fewer bits cost more
    assert sens.bytes[0] == W.numel() * 2 and sens.bytes[2] == W.numel() // 2 + W.shape[0] * 2 * 2


def test_auto_meets_a_byte_budget_below_the_dense_embedding_floor(tiny, tmp_path):
    tok, data, _ids = tiny
    kw = {"tokenizer": tok, "data": data, "samples": 8, "seq_len": 32, "fisher_samples": 4}
    model = _tied(tok)
    linears = [tuple(p.shape) for n, p in model.named_parameters() if n.startswith("model.layers.") and p.dim() == 2]
    smallest = sum(min(layer_bytes({"shape": list(s), "bits": b, "group_size": g}) for b in (2, 3, 4, 8)
                       for g in (32, 64, 128)) for s in linears)
    floor = size_report(model)["size_bytes"] - sum(o * i * 2 for o, i in linears) + smallest
    # below the smallest model with a dense embedding (every linear at its smallest setting): refused as before
    budget = f"{floor * 0.9:.0f}B"
    with pytest.raises(LlmpressError, match="below what the candidates can reach"):
        auto(model, budget, embedding=False, **kw)
    table = tmp_path / "table.json"
    result = auto(model, budget, table=table, **kw)
    assert result.report["size_bytes"] <= floor * 0.9 and result.report["embedding"]["setting"] != "dense"
    assert result.recipe.stages[0].method == "embedding" and "embedding" in json.loads(table.read_text())
    compressed = llmpress.compress(_tied(tok), result.recipe, tokenizer=tok, out=tmp_path / "q")
    assert size_report(compressed.model, compressed.layers)["size_bytes"] == result.report["size_bytes"]
    saved = llmpress.evaluate(tmp_path / "q", data, seq_len=32, max_windows=2, measure_speed=False)
    assert saved["size_bytes"] == result.report["size_bytes"] <= floor * 0.9
    assert saved["linear_bits_per_weight"] == pytest.approx(result.report["linear_bits_per_weight"])
    # the table serves the next budget without measuring the embedding again
    again = auto(model, f"{floor * 0.95:.0f}B", table=table, **kw)
    assert again.embedding.cost == result.embedding.cost and again.report["size_bytes"] <= floor * 0.95
    # bits-per-weight budgets leave it alone
    assert "embedding" not in auto(model, "3bpw", **kw).report


def test_cli_auto_keep_embedding_refuses_what_the_default_meets(tiny, tmp_path, capsys):
    tok, data, _ids = tiny
    folder = tmp_path / "model"
    model = _tied(tok)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    capsys.readouterr()
    whole = size_report(model)["size_bytes"]
    args = ["auto", str(folder), "--budget", f"{whole * 0.3:.0f}B", "--data", data, "--samples", "8", "--seq-len",
            "32", "--fisher-samples", "4", "--quiet"]
    assert main([*args, "--keep-embedding", "--out", str(tmp_path / "a.yaml")]) == 2
    err = capsys.readouterr().err
    assert "below what the candidates can reach" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--out", str(tmp_path / "b.yaml")]) == 0
    assert "embedding (model.embed_tokens, tied with the head): embedding-w" in capsys.readouterr().out
    assert main(["compress", str(folder), "--recipe", str(tmp_path / "b.yaml"), "--out", str(tmp_path / "c"),
                 "--quiet"]) == 0
    records = json.loads((tmp_path / "c" / "llmpress.json").read_text())["layers"]
    assert size_report(llmpress.load_model(tmp_path / "c").model, records)["size_bytes"] <= whole * 0.3


def test_gguf_writes_the_embedding_codes_as_token_embd(tiny, tmp_path):
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType, GGUFReader, quants

    tok, _data, _ids = tiny
    model = _tied(tok)
    recipe = load_recipe({"stages": [{"method": "embedding", "args": {"bits": 4, "group_size": 32}},
                                     {"method": "rtn", "args": {"bits": 4, "group_size": 32}}]})
    result = llmpress.compress(model, recipe, tokenizer=tok, out=tmp_path / "q.gguf", format="gguf")
    assert result.gguf.types["token_embd.weight"] == "Q4_0" and "token_embd.weight" in result.gguf.exact
    tensor = next(t for t in GGUFReader(tmp_path / "q.gguf").tensors if t.name == "token_embd.weight")
    W = quants.dequantize(tensor.data, GGMLQuantizationType.Q4_0).reshape(model.model.embed_tokens.weight.shape)
    torch.testing.assert_close(torch.from_numpy(W.copy()), model.model.embed_tokens.weight.detach(), rtol=0, atol=1e-3)

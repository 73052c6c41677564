"""Structured width pruning: shrunk matrices equal a masked reference, configs reload, scores match references."""

import copy
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmpress import compress, load_model
from llmpress.errors import LlmpressError
from llmpress.measure import count_params, flops_per_token, size_report
from llmpress.models.archs import arch_for, get_blocks
from llmpress.prune.passes import input_moments, taylor_importance, width_linears
from llmpress.prune.structured import (
    WidthConfig,
    WidthPlan,
    apply_plan,
    dims,
    taylor_scores,
    width_candidates,
    width_prune,
)
from llmpress.save import save_model
from tiny_models import random_ids, tiny_model

HD = 16  # tiny models: hidden 64 / 4 heads; 2 KV heads -> 2 query heads per KV group


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _masked_reference(model, keep_groups, keep_channels, per_group):
    """A copy with the pruned heads' q/k/v rows, o columns and the pruned channels zeroed, nothing shrunk."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for block, groups, channels in zip(get_blocks(ref, arch_for(ref)), keep_groups, keep_channels):
            attn, mlp = block.self_attn, block.mlp
            for g in range(attn.k_proj.weight.shape[0] // HD):
                if g in groups:
                    continue
                kv = slice(g * HD, (g + 1) * HD)
                q = slice(g * per_group * HD, (g + 1) * per_group * HD)
                for lin, rows in ((attn.q_proj, q), (attn.k_proj, kv), (attn.v_proj, kv)):
                    lin.weight[rows] = 0
                    if lin.bias is not None:
                        lin.bias[rows] = 0
                attn.o_proj.weight[:, q] = 0
            for c in range(mlp.gate_proj.weight.shape[0]):
                if c not in channels:
                    mlp.gate_proj.weight[c] = 0
                    mlp.up_proj.weight[c] = 0
                    mlp.down_proj.weight[:, c] = 0
    return ref


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_shrunk_equals_masked_reference(model_type):
    model = tiny_model(model_type, seed=1)
    arch = arch_for(model)
    d = dims(model, arch)
    assert (d.kv_groups, d.per_group, d.head_dim, d.channels) == (2, 2, HD, 128)
    gen = torch.Generator().manual_seed(0)
    keep_groups = ((0,), (1,))
    keep_channels = tuple(tuple(sorted(torch.randperm(128, generator=gen)[:100].tolist())) for _ in range(2))
    plan = WidthPlan(1, 28, keep_groups, keep_channels, 0, 0.0)
    ref = _masked_reference(model, keep_groups, keep_channels, d.per_group)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, arch, plan, d)
    ids = random_ids(2, 12, seed=2)
    torch.testing.assert_close(_logits(pruned, ids), _logits(ref, ids), rtol=1e-5, atol=1e-5)
    for old, new, groups, chans in zip(get_blocks(model, arch), get_blocks(pruned, arch), keep_groups, keep_channels):
        g = groups[0]
        q_rows = list(range(g * 2 * HD, (g + 1) * 2 * HD))
        assert torch.equal(new.self_attn.q_proj.weight, old.self_attn.q_proj.weight[q_rows])
        assert torch.equal(new.self_attn.k_proj.weight, old.self_attn.k_proj.weight[g * HD:(g + 1) * HD])
        assert torch.equal(new.self_attn.o_proj.weight, old.self_attn.o_proj.weight[:, q_rows])
        assert torch.equal(new.mlp.up_proj.weight, old.mlp.up_proj.weight[list(chans)])
        assert torch.equal(new.mlp.down_proj.weight, old.mlp.down_proj.weight[:, list(chans)])
    cfg = pruned.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (2, 1, HD, 100)


@pytest.mark.parametrize("bias", [False, True])
def test_saved_folder_loads_in_plain_transformers(bias, tmp_path, caplog):
    model = tiny_model("llama", seed=2)
    arch = arch_for(model)
    ids = random_ids(8, 24, seed=3)
    width_prune(model, arch, ids, WidthConfig(target=0.25, bias=bias, prune="both"), batch_size=4)
    assert model.config.attention_bias == bias and model.config.mlp_bias == bias
    save_model(model, None, tmp_path / "out", {})
    with caplog.at_level(logging.WARNING):
        plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True,
                                                           attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not [r for r in caplog.records if "weights" in r.getMessage().lower()]
    torch.testing.assert_close(_logits(plain.eval(), ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    loaded = load_model(tmp_path / "out").model
    loaded.set_attn_implementation("eager")
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    assert plain.generate(ids[:1, :4], max_new_tokens=4, min_new_tokens=4, do_sample=False).shape == (1, 8)


def test_bias_compensation_keeps_first_block_mean_output():
    """FLAP: removed channels replaced by their calibration mean, so block 0's o_proj/down_proj inputs'
    removed part contributes its mean; block 0's o_proj output mean over the calibration tokens is kept."""
    model = tiny_model("llama", seed=4)
    arch = arch_for(model)
    ids = random_ids(4, 16, seed=5)
    outputs = {}

    def grab(key):
        return lambda _m, _a, out: outputs.setdefault(key, out.detach().reshape(-1, out.shape[-1]).mean(0))

    original = copy.deepcopy(model)
    width_prune(model, arch, ids, WidthConfig(target=0.3, bias=True, prune="heads"), batch_size=4)
    assert model.config.num_key_value_heads == 1
    for key, m in (("before", original), ("after", model)):
        handle = get_blocks(m, arch)[0].self_attn.o_proj.register_forward_hook(grab(key))
        _logits(m, ids)
        handle.remove()
    torch.testing.assert_close(outputs["after"], outputs["before"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(get_blocks(model, arch)[0].self_attn.o_proj.bias, torch.zeros(64))


def test_fluctuation_moments_match_plain_computation():
    model = tiny_model("qwen2", seed=5)
    arch = arch_for(model)
    ids = random_ids(6, 16, seed=6)
    moments = input_moments(model, arch, ids, torch.device("cpu"), batch_size=4)
    seen = {}

    def record(key):
        def hook(_module, args):
            seen[key] = args[0].reshape(-1, args[0].shape[-1]).double()
        return hook

    handles = [get_blocks(model, arch)[i].get_submodule(n).register_forward_pre_hook(record((i, n)))
               for i in range(2) for n in (width_linears(arch)[0][3], width_linears(arch)[1][2])]
    _logits(model, ids)
    for h in handles:
        h.remove()
    for (i, name), X in seen.items():
        mean, var = moments[i][name]
        torch.testing.assert_close(mean, X.mean(0))
        torch.testing.assert_close(var, X.var(0, unbiased=True))


def testtaylor_scores_match_autograd_reference():
    model = tiny_model("llama", seed=6)
    arch = arch_for(model)
    ids = random_ids(4, 16, seed=7)
    imps = taylor_importance(model, arch, ids, torch.device("cpu"), batch_size=2)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    ref = copy.deepcopy(model)
    ref(input_ids=ids, labels=ids).loss.backward()
    attn, mlp = ref.model.layers[1].self_attn, ref.model.layers[1].mlp
    groups, channels = taylor_scores(imps[1], dims(model, arch))

    def imp(lin):
        return (lin.weight * lin.weight.grad).abs().double()

    for g in range(2):
        q, kv = slice(g * 2 * HD, (g + 1) * 2 * HD), slice(g * HD, (g + 1) * HD)
        expected = (imp(attn.q_proj)[q].sum() + imp(attn.k_proj)[kv].sum() + imp(attn.v_proj)[kv].sum()
                    + imp(attn.o_proj)[:, q].sum())
        torch.testing.assert_close(groups[g], expected, rtol=1e-4, atol=1e-9)
    expected = imp(mlp.gate_proj).sum(1) + imp(mlp.up_proj).sum(1) + imp(mlp.down_proj).sum(0)
    torch.testing.assert_close(channels, expected, rtol=1e-4, atol=1e-9)


def test_candidates_meet_budget_and_remove_lowest_scores():
    gen = torch.Generator().manual_seed(0)
    g_scores, c_scores = torch.rand(3, 3, generator=gen), torch.rand(3, 40, generator=gen)
    budget = 3 * (100 + 17 * 5)
    plans = width_candidates(g_scores, c_scores, 100, 5, budget, "both")
    assert [(p.groups_removed, p.channels_removed) for p in plans] == [(0, 37), (1, 17), (2, 0)]
    plan = plans[1]
    assert plan.removed_params == budget
    for layer in range(3):
        removed = sorted(set(range(40)) - set(plan.keep_channels[layer]))
        assert removed == sorted(torch.argsort(c_scores[layer])[:17].tolist())
    expected = sum(float(torch.sort(g_scores[i]).values[:1].sum() + torch.sort(c_scores[i]).values[:17].sum())
                   for i in range(3))
    assert plan.score == pytest.approx(expected)
    assert [(p.groups_removed, p.channels_removed) for p in width_candidates(g_scores, c_scores, 100, 5, budget,
                                                                              "heads")] == [(2, 0)]
    assert [p.channels_removed for p in width_candidates(g_scores, c_scores, 100, 5, 100, "mlp", 4)] == [8]


def test_measured_split_and_size_flops_reports():
    model = tiny_model("llama", seed=7)
    arch = arch_for(model)
    total = count_params(model)["total"]
    ids = random_ids(8, 16, seed=8)
    layers = width_prune(model, arch, ids, WidthConfig(target=0.2, split="measure", channel_multiple=8), batch_size=4)
    left = count_params(model)["total"]
    assert 0.17 < 1 - left / total < 0.23
    assert model.config.intermediate_size % 8 == 0
    size = size_report(model, layers)
    assert size["params"]["total"] == left and size["size_bytes"] == 2 * left
    assert size["dense_bytes"] == 2 * total and size["compression_ratio"] == pytest.approx(total / left)
    linear = sum(m.weight.numel() for n, m in model.named_modules() if n.startswith("model.layers")
                 and isinstance(m, torch.nn.Linear))
    flops = flops_per_token(model.config, 16, layers, model=model)
    assert flops["linear"] == 2 * linear
    heads = model.config.num_attention_heads
    assert flops["attention"] == round(2 * 2 * 2 * heads * HD * 8)


def test_errors():
    with pytest.raises(LlmpressError, match="target"):
        WidthConfig(target=1.5)
    with pytest.raises(LlmpressError, match="metric"):
        WidthConfig(metric="random")
    gpt2 = tiny_model("gpt2")
    with pytest.raises(LlmpressError, match="does not support 'gpt2'"):
        width_prune(gpt2, arch_for(gpt2), random_ids(2, 8), WidthConfig())
    llama = tiny_model("llama")
    with pytest.raises(LlmpressError, match="cannot be met"):
        width_prune(llama, arch_for(llama), random_ids(2, 8), WidthConfig(target=0.9))


def test_recipe_through_api(tmp_path):
    from tiny_models import TOKENIZER_TEXT, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=3, vocab_size=len(tok))
    text = tmp_path / "calib.txt"
    text.write_text(TOKENIZER_TEXT * 3)
    result = compress(model, "width-20-taylor", tokenizer=tok, data=f"text:{text}", samples=4, seq_len=32,
                      out=tmp_path / "out")
    assert result.model.config.intermediate_size < 128
    reloaded = load_model(tmp_path / "out")
    assert reloaded.meta["recipe"]["name"] == "width-20-taylor"
    assert reloaded.model.config.intermediate_size == result.model.config.intermediate_size

"""Depth pruning: removing block k equals an identity block k, caches still work, BI matches a plain formula."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmpress import compress, load_model
from llmpress.errors import LlmpressError
from llmpress.models.archs import arch_for, get_blocks
from llmpress.prune.depth import DepthConfig, block_influences, blocks_for, depth_prune, greedy_by_loss, remove_blocks
from llmpress.save import save_model
from tiny_models import random_ids, tiny_model

THREE = {
    "llama": {"num_hidden_layers": 3},
    "gemma3_text": {
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    },
    "gpt2": {"n_layer": 3},
}


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _identity_reference(model, k):
    """A copy whose block k returns its input unchanged (in the block's own output format)."""
    ref = copy.deepcopy(model)
    block = get_blocks(ref, arch_for(ref))[k]
    probe = {}

    def hook(_module, _args, out):
        probe["tuple"] = isinstance(out, tuple)

    handle = block.register_forward_hook(hook)
    _logits(ref, random_ids(1, 4))
    handle.remove()
    tuple_out = probe["tuple"]
    block.forward = lambda *a, **kw: ((a[0] if a else kw["hidden_states"]),) if tuple_out else (
        a[0] if a else kw["hidden_states"])
    return ref


@pytest.mark.parametrize("model_type", list(THREE))
def test_removed_block_equals_identity_and_cache_works(model_type, tmp_path):
    model = tiny_model(model_type, seed=1, **THREE[model_type])
    arch = arch_for(model)
    ids = random_ids(2, 12, seed=2)
    ref = _identity_reference(model, 1)
    remove_blocks(model, arch, [1])
    assert len(get_blocks(model, arch)) == 2 and model.config.num_hidden_layers == 2
    full = _logits(model, ids, use_cache=False)
    torch.testing.assert_close(full, _logits(ref, ids, use_cache=False), rtol=1e-5, atol=1e-5)
    if model_type == "gemma3_text":
        assert model.config.layer_types == ["sliding_attention", "sliding_attention"]
    with torch.no_grad():  # incremental decoding: the renumbered layer_idx index the KV cache correctly
        first = model(input_ids=ids[:, :8], use_cache=True)
        rest = model(input_ids=ids[:, 8:], past_key_values=first.past_key_values, use_cache=True).logits
    torch.testing.assert_close(rest, full[:, 8:], rtol=1e-4, atol=1e-4)
    save_model(model, None, tmp_path / "out", {})
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True,
                                                       attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(_logits(plain.eval(), ids, use_cache=False), full, rtol=1e-5, atol=1e-5)


def test_block_influence_matches_plain_cosine():
    model = tiny_model("llama", seed=3, num_hidden_layers=3)
    arch = arch_for(model)
    ids = random_ids(6, 10, seed=4)
    got = block_influences(model, arch, ids, torch.device("cpu"), batch_size=4)
    seen = {}

    def record(i):
        def hook(_m, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            seen[i] = (x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double())
        return hook

    handles = [b.register_forward_hook(record(i), with_kwargs=True) for i, b in enumerate(get_blocks(model, arch))]
    _logits(model, ids, use_cache=False)
    for h in handles:
        h.remove()
    for i, (x, y) in seen.items():
        cos = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))
        assert got[i] == pytest.approx(1 - cos.mean().item(), rel=1e-6, abs=1e-9)


def test_greedy_loss_picks_least_harmful_block():
    model = tiny_model("llama", seed=5, num_hidden_layers=4)
    arch = arch_for(model)
    ids = random_ids(4, 16, seed=6)
    chosen = greedy_by_loss(model, arch, ids, 1, torch.device("cpu"), batch_size=2)
    losses = []
    for k in range(4):
        ref = _identity_reference(model, k)
        with torch.no_grad():
            losses.append(ref(input_ids=ids, labels=ids, use_cache=False).loss.item())
    assert chosen == [min(range(4), key=losses.__getitem__)]
    layers = depth_prune(model, arch, ids, DepthConfig(blocks=1, metric="ppl"), batch_size=2)
    assert model.config.num_hidden_layers == 3
    assert {m["original_block"] for m in layers.values()} == set(range(4)) - set(chosen)


def test_block_count_from_target_and_errors():
    model = tiny_model("llama", seed=0, num_hidden_layers=5)
    arch = arch_for(model)
    total = sum(p.numel() for p in model.parameters())
    per_block = sum(p.numel() for p in get_blocks(model, arch)[0].parameters())
    for target in (0.2, 0.35, 0.5):
        assert blocks_for(model, arch, DepthConfig(target=target)) == round(target * total / per_block)
    with pytest.raises(LlmpressError, match="blocks"):
        blocks_for(model, arch, DepthConfig(blocks=5))
    with pytest.raises(LlmpressError, match="metric"):
        DepthConfig(metric="random")
    with pytest.raises(LlmpressError, match="cannot remove"):
        remove_blocks(model, arch, [7])


def test_depth_recipe_through_api(tmp_path):
    from tiny_models import TOKENIZER_TEXT, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen2", seed=3, vocab_size=len(tok), num_hidden_layers=5)
    text = tmp_path / "calib.txt"
    text.write_text(TOKENIZER_TEXT * 3)
    result = compress(model, "depth-20", tokenizer=tok, data=f"text:{text}", samples=4, seq_len=32,
                      out=tmp_path / "out")
    assert result.model.config.num_hidden_layers == 4
    reloaded = load_model(tmp_path / "out")
    assert reloaded.model.config.num_hidden_layers == 4 and len(reloaded.model.config.layer_types) == 4
    ids = random_ids(1, 8, seed=1) % len(tok)
    reloaded.model.set_attn_implementation("eager")
    torch.testing.assert_close(_logits(reloaded.model, ids), _logits(result.model, ids), rtol=1e-5, atol=1e-5)

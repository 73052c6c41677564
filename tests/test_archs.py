"""The architecture table against real transformers modules, one tiny model per type.

Each entry is checked by behaviour, not by name: every linear of a block is
listed, linears in one group receive the same input, groups run in order,
norm feeds hand their output straight to the fed linears, and every feed is
an exact fold (scale the source by 1/s, the fed inputs by s: logits unchanged).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM
from transformers.pytorch_utils import Conv1D

from llmpress.errors import LlmpressError
from llmpress.models.archs import (
    ARCHS,
    Arch,
    arch_for,
    block_linears,
    discover_arch,
    get_blocks,
    linear_input_size,
    linear_weight,
    set_linear_weight,
)
from tiny_models import EXTRA_TYPES, HEADS, TINY_TYPES, random_ids, tiny_config, tiny_model

ALL_TYPES = TINY_TYPES + EXTRA_TYPES
# Types whose table lists a v->o fold that GQA removes; built with MHA to test that fold.
MHA_TYPES = tuple(t for t in ALL_TYPES if ARCHS[t].mha_only_feeds and t != "opt")


def _scan_linears(block: nn.Module) -> set[str]:
    return {name for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def _trace(model: nn.Module, modules: dict[str, nn.Module]) -> tuple[list[str], dict, dict]:
    """Run the model once; per module its first input and output, and the call order."""
    order: list[str] = []
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_module, args, output):
            if name not in inputs:
                order.append(name)
                inputs[name] = args[0].detach().clone()
                outputs[name] = output.detach().clone()
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model(random_ids())
    finally:
        for handle in handles:
            handle.remove()
    return order, inputs, outputs


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(random_ids()).logits


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_table_entry_found_and_every_linear_listed(model_type):
    model = tiny_model(model_type)
    arch = arch_for(model)
    assert arch.name == model_type == model.config.model_type
    assert (arch.blocks, arch.groups) == (ARCHS[model_type].blocks, ARCHS[model_type].groups)
    blocks = get_blocks(model, arch)
    assert len(blocks) == model.config.get_text_config().num_hidden_layers
    for block in blocks:
        linears = block_linears(block, arch)
        assert list(linears) == list(arch.linear_names)
        assert set(linears) == _scan_linears(block)
        assert all(isinstance(m, Conv1D) == arch.transposed for m in linears.values())


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_groups_share_one_input_and_run_in_order(model_type):
    model = tiny_model(model_type)
    arch = arch_for(model)
    for block in get_blocks(model, arch):
        order, inputs, _ = _trace(model, block_linears(block, arch))
        assert set(order) == set(arch.linear_names), "every linear runs"
        first_calls = [order.index(group[0]) for group in arch.groups]
        assert first_calls == sorted(first_calls), f"groups out of execution order: {order}"
        for group in arch.groups:
            assert all(torch.equal(inputs[name], inputs[group[0]]) for name in group), group
        heads = [inputs[group[0]] for group in arch.groups]
        for i, a in enumerate(heads):
            assert not any(a.shape == b.shape and torch.equal(a, b) for b in heads[i + 1:])


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_norm_feeds_hand_their_output_to_the_fed_linears(model_type):
    model = tiny_model(model_type)
    arch = arch_for(model)
    block = get_blocks(model, arch)[-1]
    norm_feeds = [feed for feed in arch.feeds if feed[0] not in arch.linear_names]
    assert norm_feeds, "every table entry has norm feeds"
    modules = {name: block.get_submodule(name) for feed in norm_feeds for name in (feed[0], *feed[1])}
    _, inputs, outputs = _trace(model, modules)
    for source, fed in norm_feeds:
        for name in fed:
            assert torch.equal(outputs[source], inputs[name]), (source, name)


def _fold(block: nn.Module, arch: Arch, source: str, fed: tuple[str, ...], scales: torch.Tensor) -> None:
    """Divide the source's output channels by ``scales``, multiply the fed inputs by them."""
    src = block.get_submodule(source)
    if source in arch.linear_names:
        set_linear_weight(src, arch, linear_weight(src, arch) / scales[:, None])
    else:  # norm: normed * (norm_offset + weight) + bias
        src.weight.data = (arch.norm_offset + src.weight.data) / scales - arch.norm_offset
    if getattr(src, "bias", None) is not None:
        src.bias.data = src.bias.data / scales
    for name in fed:
        module = block.get_submodule(name)
        set_linear_weight(module, arch, linear_weight(module, arch) * scales[None, :])


def _source_width(block: nn.Module, arch: Arch, source: str) -> int:
    module = block.get_submodule(source)
    return linear_weight(module, arch).shape[0] if source in arch.linear_names else module.weight.numel()


def _check_feeds_fold_exactly(model: nn.Module) -> None:
    arch = arch_for(model)
    reference = _logits(model)
    generator = torch.Generator().manual_seed(1)
    for source, fed in arch.feeds:
        for block in get_blocks(model, arch):
            width = _source_width(block, arch, source)
            scales = 0.5 + 1.5 * torch.rand(width, generator=generator)
            _fold(block, arch, source, fed, scales)
        torch.testing.assert_close(_logits(model), reference, rtol=1e-4, atol=1e-4, msg=source)
    # Control: scaling a source alone (no compensation) must change the logits.
    # Per-channel scales: a uniform one can vanish in a later norm (Gemma3's QK/sandwich norms).
    for source, _ in arch.feeds:
        block = get_blocks(model, arch)[0]
        scales = 0.5 + 1.5 * torch.rand(_source_width(block, arch, source), generator=generator)
        _fold(block, arch, source, (), scales)
        assert not torch.allclose(_logits(model), reference, rtol=1e-3, atol=1e-3), source
        _fold(block, arch, source, (), 1 / scales)


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_feeds_are_exact_folds(model_type):
    _check_feeds_fold_exactly(tiny_model(model_type))


@pytest.mark.parametrize("model_type", MHA_TYPES)
def test_v_to_o_feed_is_an_exact_fold_under_mha(model_type):
    model = tiny_model(model_type, num_key_value_heads=HEADS)
    assert any(source in ARCHS[model_type].mha_only_feeds for source, _ in arch_for(model).feeds)
    _check_feeds_fold_exactly(model)


def test_config_specialisation():
    assert "self_attn.v_proj" not in dict(arch_for(tiny_model("llama")).feeds), "GQA drops v->o"
    assert "self_attn.v_proj" in dict(arch_for(tiny_model("llama", num_key_value_heads=HEADS)).feeds)
    post_ln = arch_for(tiny_model("opt", do_layer_norm_before=False))
    assert post_ln.feeds == (("self_attn.v_proj", ("self_attn.out_proj",)), ("fc1", ("fc2",)))
    assert "fc1" not in dict(arch_for(tiny_model("opt", activation_function="gelu")).feeds)
    assert arch_for(tiny_model("gpt_neox")).parallel_residual
    assert not arch_for(tiny_model("gpt_neox", use_parallel_residual=False)).parallel_residual
    assert ARCHS["gemma3_text"].norm_offset == 1.0 and ARCHS["llama"].norm_offset == 0.0


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_linear_weight_is_out_in_and_writes_back(model_type):
    model = tiny_model(model_type)
    arch = arch_for(model)
    generator = torch.Generator().manual_seed(2)
    for name, module in block_linears(get_blocks(model, arch)[0], arch).items():
        weight = linear_weight(module, arch)
        assert weight.shape[1] == linear_input_size(module, arch)
        x = torch.randn(3, weight.shape[1], generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(module(x), F.linear(x, weight, module.bias), msg=name)
        param = module.weight
        new = weight + 0.1 * torch.randn(weight.shape, generator=generator)
        set_linear_weight(module, arch, new)
        assert module.weight is param and module.weight.dtype == torch.float32
        assert torch.equal(linear_weight(module, arch), new)
        with torch.no_grad():
            torch.testing.assert_close(module(x), F.linear(x, new, module.bias), msg=name)
        with pytest.raises(RuntimeError, match="shape"):
            set_linear_weight(module, arch, new.t() if new.shape[0] != new.shape[1] else new[:1])


def test_conv1d_is_transposed_at_the_boundary():
    model = tiny_model("gpt2")
    arch = arch_for(model)
    c_fc = block_linears(get_blocks(model, arch)[0], arch)["mlp.c_fc"]
    assert arch.transposed and c_fc.weight.shape == (64, 128)
    assert linear_weight(c_fc, arch).shape == (128, 64)


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_discovery_matches_the_table(model_type, monkeypatch, caplog):
    model = tiny_model(model_type)
    monkeypatch.setattr(model.config, "model_type", "mystery")
    with caplog.at_level(logging.WARNING, logger="llmpress.models.archs"):
        arch = arch_for(model)
    assert "no table entry for model_type 'mystery'" in caplog.text
    table = ARCHS[model_type]
    assert (arch.name, arch.blocks, arch.groups) == ("mystery", table.blocks, table.groups)
    assert arch.transposed == table.transposed and arch.feeds == ()
    assert discover_arch(model) == arch


def test_discovery_fails_cleanly_without_a_block_list(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(model.config, "model_type", "mystery")
    monkeypatch.setattr(model.config, "num_hidden_layers", 5)
    with pytest.raises(LlmpressError, match="unsupported architecture 'mystery'.*5 decoder blocks"):
        arch_for(model)


@pytest.mark.parametrize("build", [
    lambda: AutoModelForSeq2SeqLM.from_config(tiny_config_t5()),
    lambda: AutoModelForMaskedLM.from_config(tiny_config_bert()),
    lambda: AutoModel.from_config(tiny_config_bert()),
], ids=["t5", "bert-mlm", "bert"])
def test_encoder_models_are_unsupported(build):
    with pytest.raises(LlmpressError, match="unsupported architecture") as info:
        arch_for(build())
    assert "\n" not in str(info.value) and "llama" in str(info.value)


def tiny_config_t5():
    from transformers import T5Config
    return T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)


def tiny_config_bert():
    from transformers import BertConfig
    return BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=64)


def test_missing_linear_is_a_bug_not_user_error():
    model = tiny_model("llama")
    broken = Arch(name="llama", blocks="model.layers", groups=(("self_attn.nope",),))
    with pytest.raises(RuntimeError, match="no linear 'self_attn.nope'"):
        block_linears(get_blocks(model, broken)[0], broken)
    with pytest.raises(RuntimeError, match="no module 'model.nope'"):
        get_blocks(model, Arch(name="llama", blocks="model.nope", groups=()))


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_tiny_model_round_trips_offline(model_type, tmp_path):
    model = tiny_model(model_type)
    assert model.config.dtype == torch.float32 and not model.training
    assert all(p.std() > 0 for p in model.parameters() if p.dim() == 1 and p.numel() > 1)
    assert torch.equal(_logits(model), _logits(tiny_model(model_type)))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(loaded) is type(model) and arch_for(loaded) == arch_for(model)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    assert tiny_config(model_type).model_type == model_type

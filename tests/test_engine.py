"""The sequential engine: one block on the device at a time, true statistics, same result as whole-model RTN."""

import pytest
import torch
from torch import nn

from llmpress.compressed import Compressed
from llmpress.engine import Placement, compress_blocks
from llmpress.models.archs import arch_for, block_linears, get_blocks, linear_weight
from llmpress.quant.rtn import RTNConfig, rtn
from llmpress.recipe import load_recipe
from llmpress.registry import Method, methods
from llmpress.stats import ColumnNormStats, HessianStats
from tiny_models import TINY_TYPES, random_ids, tiny_model


class StorePlacement(Placement):
    """Offloads a block by stashing its tensors and moving it to the meta device.

    A block on 'meta' has no data: if the engine ran or touched any block but
    the onloaded one, the forward would fail. The log records every move.
    """

    def __init__(self):
        super().__init__(torch.device("cpu"), torch.device("meta"))
        self.store, self.log = {}, []

    def offload(self, block):
        self.store[id(block)] = {k: v.clone() for k, v in block.state_dict().items()}
        block.to("meta")
        self.log.append(("off", id(block)))

    def onload(self, block):
        block.to_empty(device="cpu")
        block.load_state_dict(self.store.pop(id(block)))
        self.log.append(("on", id(block)))


@pytest.fixture
def stats_method(monkeypatch):
    """A method that needs statistics and changes nothing: records what the engine handed it."""
    seen = []

    def identity(weight, hessian, norms, cfg):
        seen.append((hessian, norms))
        return Compressed(weight=weight, meta={"method": "identity-stats"})

    monkeypatch.setitem(methods(), "identity-stats",
                       Method("identity-stats", RTNConfig, identity, ("hessian", "col_norm"), "quantize"))
    return seen


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _reference_stats(model, arch, ids):
    """Hessian and column norms of every block linear from one plain forward of the whole model."""
    acc, handles = {}, []
    for i, block in enumerate(get_blocks(model, arch)):
        for name, module in block_linears(block, arch).items():
            acc[(i, name)] = (HessianStats(torch.float64), ColumnNormStats(torch.float64))

            def hook(_m, args, _out, key=(i, name)):
                for a in acc[key]:
                    a.add_batch(args[0])
            handles.append(module.register_forward_hook(hook))
    _logits(model, ids)
    for h in handles:
        h.remove()
    return {k: (h.result(), n.result()) for k, (h, n) in acc.items()}


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_only_one_block_on_device_and_statistics_are_exact(model_type, stats_method):
    model = tiny_model(model_type, seed=1)
    arch = arch_for(model)
    ids = random_ids(6, 16, seed=2)
    before = _logits(model, ids)
    reference = _reference_stats(model, arch, ids)
    blocks = get_blocks(model, arch)
    placement = StorePlacement()
    for block in blocks:
        placement.offload(block)
    placement.log.clear()
    checked = []

    def on_block(i, block, all_blocks):
        devices = [{p.device.type for p in b.parameters()} for b in all_blocks]
        assert devices[i] == {"cpu"}
        assert all(d == {"meta"} for j, d in enumerate(devices) if j != i)
        checked.append(i)

    stage = load_recipe({"stages": [{"method": "identity-stats"}]}).stages[0]
    compress_blocks(model, arch, [stage], ids, batch_size=4, placement=placement, on_block=on_block)
    assert checked == list(range(len(blocks)))
    # strictly alternating on/off: never two blocks onloaded at once
    assert [kind for kind, _ in placement.log] == ["on", "off"] * len(blocks)
    for block in blocks:
        placement.onload(block)
    assert torch.equal(_logits(model, ids), before)
    # the engine's statistics equal the ones from a plain whole-model forward (batches of 4 and 2)
    names = [n for g in arch.groups for n in g]
    assert len(stats_method) == len(blocks) * len(names)
    keys = [(i, n) for i in range(len(blocks)) for n in names]
    for key, (hessian, norms) in zip(keys, stats_method):
        ref_h, ref_n = reference[key]
        assert torch.allclose(hessian.double(), ref_h, rtol=1e-4, atol=1e-5), key
        assert torch.allclose(norms.double(), ref_n, rtol=1e-4, atol=1e-5), key


def test_engine_rtn_equals_whole_model_rtn():
    cfg = RTNConfig(bits=4, group_size=16, sym=False)
    engine_model, direct_model = tiny_model("llama", seed=3), tiny_model("llama", seed=3)
    arch = arch_for(engine_model)
    layers = compress_blocks(engine_model, arch, list(load_recipe(
        {"stages": [{"method": "rtn", "args": {"bits": 4, "group_size": 16, "sym": False}}]}).stages), None)
    for block in get_blocks(direct_model, arch):
        for module in block_linears(block, arch).values():
            module.weight.data = rtn(module.weight.data, cfg).weight
    ids = random_ids(2, 16)
    assert torch.equal(_logits(engine_model, ids), _logits(direct_model, ids))
    assert len(layers) == 2 * 7
    meta = layers["model.layers.1.mlp.down_proj"]
    assert meta["bits"] == 4 and meta["group_size"] == 16 and meta["shape"] == [64, 128]


def test_stage_order_targets_and_merged_meta():
    model = tiny_model("llama", seed=4)
    arch = arch_for(model)
    recipe = load_recipe({"stages": [
        {"method": "magnitude", "args": {"sparsity": 0.5}, "targets": ["*.mlp.*"]},
        {"method": "rtn", "args": {"bits": 4, "group_size": 32}, "ignore": ["*.down_proj"]},
    ]})
    layers = compress_blocks(model, arch, list(recipe.stages), None)
    up = layers["model.layers.0.mlp.up_proj"]
    assert up["method"] == "magnitude+rtn" and up["sparsity"] == pytest.approx(0.5) and up["bits"] == 4
    assert layers["model.layers.0.mlp.down_proj"]["method"] == "magnitude"
    assert layers["model.layers.0.self_attn.q_proj"]["method"] == "rtn"
    w = linear_weight(get_blocks(model, arch)[0].mlp.up_proj, arch)
    assert (w == 0).float().mean() >= 0.5  # pruned zeros survive quantization


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_identity_with_statistics_leaves_logits_unchanged(model_type, stats_method):
    model = tiny_model(model_type, seed=5)
    ids = random_ids(3, 16, seed=6)
    before = _logits(model, ids)
    stage = load_recipe({"stages": [{"method": "identity-stats"}]}).stages[0]
    compress_blocks(model, arch_for(model), [stage], ids, batch_size=2)
    assert torch.equal(_logits(model, ids), before)
    assert stats_method and all(torch.isfinite(h).all() for h, _ in stats_method)


def test_block_methods_see_calibration_inputs_and_results_are_kept(monkeypatch):
    """A "block" method gets run(); its hooks see the block's true inputs; results keep codes for export."""
    seen = {}

    def record(block, arch, modules, run, cfg):
        handle = modules["self_attn.q_proj"].register_forward_hook(
            lambda _m, args, _o: seen.setdefault(id(block), []).append(args[0].clone()))
        run()
        handle.remove()
        return {"self_attn.q_proj": {"method": "record"}}

    monkeypatch.setitem(methods(), "record", Method("record", RTNConfig, record, (), "block"))
    model = tiny_model("qwen3", seed=9)
    arch = arch_for(model)
    ids = random_ids(4, 16, seed=10)
    reference = _reference_stats(model, arch, ids)
    recipe = load_recipe({"stages": [{"method": "record"}, {"method": "rtn", "args": {"group_size": 16}}]})
    assert recipe.needs_calibration
    kept = {}
    layers = compress_blocks(model, arch, list(recipe.stages), ids, batch_size=4, results=kept)
    blocks = get_blocks(model, arch)
    assert [len(seen[id(b)]) for b in blocks] == [1, 1]  # one batch of 4 through each block
    x = seen[id(blocks[0])][0].reshape(-1, 64).double()  # block 0 is upstream of any compression
    assert torch.allclose(x.T @ x * 2 / x.shape[0], reference[(0, "self_attn.q_proj")][0], rtol=1e-4, atol=1e-5)
    assert layers["model.layers.0.self_attn.q_proj"]["method"] == "record+rtn"
    q = kept["model.layers.1.mlp.up_proj"]
    assert q.weight is None and q.qweight.dtype == torch.int8 and q.scale.shape == (128, 4)
    w = linear_weight(blocks[1].mlp.up_proj, arch)
    assert torch.equal((q.qweight.float() - q.zero.repeat_interleave(16, 1)) * q.scale.repeat_interleave(16, 1), w)


def test_bfloat16_calibration_keeps_statistics_close_and_weights_fp32(stats_method):
    model = tiny_model("llama", seed=12)
    arch = arch_for(model)
    ids = random_ids(8, 16, seed=13)
    reference = _reference_stats(model, arch, ids)
    stage = load_recipe({"stages": [{"method": "identity-stats"}]}).stages[0]
    compress_blocks(model, arch, [stage], ids, batch_size=4, compute_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    names = [n for g in arch.groups for n in g]
    keys = [(i, n) for i in range(2) for n in names]
    for key, (hessian, norms) in zip(keys, stats_method):
        assert hessian.dtype == torch.float32
        ref_h, ref_n = reference[key]
        scale = ref_h.diagonal().abs().max()
        assert (hessian.double() - ref_h).abs().max() < 2e-2 * scale, key  # bf16 inputs: ~3 significant digits
        assert not torch.equal(hessian.double(), ref_h)
        assert torch.allclose(norms.double(), ref_n, rtol=2e-2), key


TRUE_SEQUENTIAL = [("gptq", {"bits": 3, "group_size": 16}),
                   ("sparsegpt", {"sparsity": 0.5, "bits": 4, "group_size": 16})]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("method,args", TRUE_SEQUENTIAL, ids=[m for m, _ in TRUE_SEQUENTIAL])
def test_true_sequential_equals_group_by_group_whole_model_reference(model_type, method, args):
    """Each input group's Hessian is taken with the earlier groups (this block and before) already compressed."""
    from llmpress.models.archs import input_representatives, set_linear_weight
    from llmpress.registry import get_method

    spec = get_method(method)
    cfg = spec.config(**args, true_sequential=True)
    model = tiny_model(model_type, seed=3)
    reference = tiny_model(model_type, seed=3)
    arch = arch_for(model)
    ids = random_ids(4, 16, seed=4)
    stage = load_recipe({"stages": [{"method": method, "args": {**args, "true_sequential": True}}]}).stages[0]
    compress_blocks(model, arch, [stage], ids, batch_size=4)

    for block in get_blocks(reference, arch):
        modules = block_linears(block, arch)
        shared = input_representatives(arch, modules)
        for rep in dict.fromkeys(shared.values()):
            acc = HessianStats()
            handle = modules[rep].register_forward_hook(lambda _m, args, _o, acc=acc: acc.add_batch(args[0]))
            _logits(reference, ids)
            handle.remove()
            for name in [n for n in modules if shared[n] == rep]:
                W = linear_weight(modules[name], arch).detach().float()
                set_linear_weight(modules[name], arch, spec.fn(W, acc.result(), cfg).weight)
    for got, want in zip(get_blocks(model, arch), get_blocks(reference, arch)):
        for (name, a), b in zip(block_linears(got, arch).items(), block_linears(want, arch).values()):
            assert torch.allclose(a.weight, b.weight, atol=1e-5), name
    # and it differs from the one-pass engine (the groups after the first see compressed inputs)
    plain = tiny_model(model_type, seed=3)
    one_pass = load_recipe({"stages": [{"method": method, "args": args}]}).stages[0]
    compress_blocks(plain, arch_for(plain), [one_pass], ids, batch_size=4)
    assert not torch.allclose(_logits(plain, ids), _logits(model, ids))


@pytest.mark.parametrize("width", [1, 5, 64, 97])
def test_blocked_gram_equals_full_product(width):
    from llmpress.stats import add_gram_

    X = torch.randn(50, width, dtype=torch.float64)
    start = torch.randn(width, width, dtype=torch.float64)
    got = add_gram_(start.clone(), X)
    assert torch.allclose(got, start + X.T @ X, rtol=0, atol=1e-12)


@pytest.mark.parametrize("model_type,dtype,attention", [(t, None, None) for t in TINY_TYPES] + [
    ("llama", torch.bfloat16, None), ("llama", None, "sdpa"), ("llama", torch.bfloat16, "sdpa")])
def test_settled_sub_modules_are_reused_and_change_nothing(model_type, dtype, attention, monkeypatch):
    """True-sequential passes skip settled attention/MLP forwards (with sdpa, the recording pass also ends its later
    batches at o_proj's input); the weights equal recomputing them."""
    from llmpress import settled

    stage = load_recipe({"stages": [{"method": "gptq", "args": {"bits": 3, "group_size": 16,
                                                                 "true_sequential": True}}]}).stages[0]
    ids = random_ids(8, 16, seed=4)
    hits, memo_hits = [], []
    clear = settled.SettledOutputs.clear

    def counting_clear(self):
        hits.append(sum(r.hits for r in self.records))
        memo_hits.append(sum(m.hits for m in self.memos.values()))
        clear(self)

    monkeypatch.setattr(settled.SettledOutputs, "clear", counting_clear)
    fast = tiny_model(model_type, seed=3)
    if attention:
        fast.set_attn_implementation(attention)
    compress_blocks(fast, arch_for(fast), [stage], ids, batch_size=4, compute_dtype=dtype)
    if model_type == "llama":  # 2 batches; block 0: attention reused in the gate/up, down and final passes,
        # the MLP in the final pass; block 1 (the last) has no final pass
        assert sum(hits) == 2 * (3 + 1) + 2 * 2
    assert sum(hits) > 0 and sum(memo_hits) > 0  # and the norms are memoized
    monkeypatch.setattr(settled.SettledOutputs, "candidate", lambda *a: None)
    monkeypatch.setattr(settled.SettledOutputs, "_memoized", staticmethod(lambda memo, child: child.forward))
    slow = tiny_model(model_type, seed=3)
    if attention:
        slow.set_attn_implementation(attention)
    compress_blocks(slow, arch_for(slow), [stage], ids, batch_size=4, compute_dtype=dtype)
    for a, b in zip(fast.parameters(), slow.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_settled_linear_is_computed_once_per_batch(attention):
    """2 batches, 2 blocks. Once o_proj is settled its output is kept per batch: the gate/up, down and final passes
    of block 0 reuse one computation (2 calls) instead of computing it in each (6). The pass recording it computes
    it for its first batch only (the check that the attention returns o_proj's output), where the attention returns
    nothing else (sdpa); eager attention also returns its weights, so that pass computes it for every batch."""
    stage = load_recipe({"stages": [{"method": "gptq", "args": {"bits": 3, "group_size": 16,
                                                                 "true_sequential": True}}]}).stages[0]
    model = tiny_model("llama", seed=3)
    model.set_attn_implementation(attention)
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if name.endswith(("o_proj", "down_proj")):
            module.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    compress_blocks(model, arch_for(model), [stage], random_ids(8, 16, seed=4), batch_size=4, attribute=False)
    recording = 1 if attention == "sdpa" else 2
    assert calls == {"model.layers.0.self_attn.o_proj": recording + 2, "model.layers.0.mlp.down_proj": 1 + 2,
                     "model.layers.1.self_attn.o_proj": recording + 2, "model.layers.1.mlp.down_proj": 1}


def test_settled_output_falls_back_when_the_input_changed():
    from llmpress.settled import SettledOutputs

    block = nn.Sequential()
    block.add_module("mlp", nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4)))
    outputs = SettledOutputs(["mlp.0", "mlp.2"])
    x = torch.randn(3, 4)
    with outputs.recording(block, ["mlp.2"], later=set()) as child:
        assert child is block.mlp
        block(x)
    block.mlp[2].weight.data.mul_(2)  # "quantized"
    outputs.install(block)
    assert torch.equal(block(x), block.mlp[2](block.mlp[1](block.mlp[0](x))))
    assert outputs.hits == 1
    other = torch.randn(3, 4)
    assert torch.equal(block(other), block.mlp[2](block.mlp[1](block.mlp[0](other))))
    assert outputs.hits == 1  # a different input: computed for real
    outputs.clear()
    assert "forward" not in block.mlp.__dict__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_bitwise_same(dtype):
    from llmpress.settled import same

    a = (torch.randn(3, 5) * 100).to(dtype)
    b = a.clone()
    assert same(a, b)
    b[1, 2] += 1
    assert not same(a, b)
    assert not same(a, a[:2]) and not same(a, a.double())
    assert same(a.t(), a.clone().t())  # non-contiguous: falls back to torch.equal

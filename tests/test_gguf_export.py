"""GGUF export (llmpress.export.gguf_blocks / gguf_write): the block layouts against the ``gguf`` package's own
dequantization, codes written bit-exactly and read back, files that transformers (and llama.cpp, when the
``llama-cpp-python`` extra is installed) load with the in-memory logits, and one-line refusals."""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

import llmpress
from llmpress.cli import main
from llmpress.compressed import Grid
from llmpress.errors import LlmpressError
from llmpress.export.gguf_blocks import (
    BLOCK_TYPES,
    K_TYPES,
    block_type_for,
    pack_blocks,
    unpack_blocks,
    unpack_kquant,
    why_not,
)
from llmpress.export.gguf_write import META_KEY, pre_tokenizer_name, write_gguf
from llmpress.measure import llamacpp
from llmpress.primitives import dequantize, kquant_qparams, minmax_qparams, quantize
from llmpress.quant.gptq import GPTQConfig, gptq
from llmpress.quant.rtn import RTNConfig, rtn
from tiny_models import TOKENIZER_TEXT, tiny_model

ARCHS = [("llama", {}), ("mistral", {"sliding_window": None}), ("qwen2", {}),
         # transformers' GGUF reader takes Qwen3's head_dim as 128 (it ignores attention.key_length)
         ("qwen3", {"head_dim": 128})]


def _codes(kind, rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (kind.bits - 1)), 2 ** (kind.bits - 1) - 1
    codes = torch.randint(lo, hi + 1, (rows, cols), generator=g).to(torch.int8)
    scale = torch.rand(rows, cols // 32, generator=g) + 0.01
    zero = None if kind.sym else torch.randint(lo, hi + 1, (rows, cols // 32), generator=g).float()
    return codes, scale, zero


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
def test_blocks_dequantize_in_the_gguf_package_to_our_weights(name):
    kind = BLOCK_TYPES[name]
    codes, scale, zero = _codes(kind, 6, 128)
    data = pack_blocks(codes, scale, zero, kind)
    assert data.shape == (6, 4 * kind.nbytes) and data.dtype == np.uint8
    got = quants.dequantize(data, GGMLQuantizationType[name])
    # plain reference: llama.cpp's x = (q - o) d or q d + m with fp16 d, m; q = c + o
    d = scale.half().float().repeat_interleave(32, dim=1)
    if kind.sym:
        want = codes.float() * d
    else:
        m = (-(kind.offset + zero) * scale).half().float().repeat_interleave(32, dim=1)
        want = (codes.float() + kind.offset) * d + m
    assert np.array_equal(got, want.numpy())
    back, d_back, m_back = unpack_blocks(data, kind, 128)
    assert torch.equal(back, codes) and torch.equal(d_back, scale.half().float())


def test_codes_outside_the_type_and_grids_that_fit_none_are_refused():
    with pytest.raises(ValueError, match=r"outside \[-8, 7\]"):
        pack_blocks(torch.full((1, 32), 9, dtype=torch.int8), torch.ones(1, 1), None, BLOCK_TYPES["Q4_0"])
    assert block_type_for(Grid(4, 32, True), 64).name == "Q4_0"
    assert block_type_for(Grid(4, 32, False, float_zero=True), 64).name == "Q4_1"
    assert block_type_for(Grid(8, 32, True), 64).name == "Q8_0"
    assert "groups of 64" in why_not(Grid(4, 64, True), 64)
    assert "one scale per row" in why_not(Grid(8, -1, True), 64)
    assert "no block type for symmetric 3-bit" in why_not(Grid(3, 32, True), 64)
    assert "not a multiple of 32" in why_not(Grid(4, 32, True), 48)
    assert "W8A8" in why_not(Grid(8, 32, True, act_bits=8), 64)


def test_minmax_grid_recovers_llama_cpp_q4_1_blocks_exactly():
    # weights that are themselves a Q4_1 dequantization (the default model's case) come back bit for bit
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    blocks = quants.quantize(x, GGMLQuantizationType.Q4_1)
    W = torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType.Q4_1).copy())
    result = rtn(W, RTNConfig(bits=4, group_size=32, sym=False, float_zero=True))
    assert np.array_equal(pack_blocks(result.qweight, result.scale, result.zero, BLOCK_TYPES["Q4_1"]), blocks)
    # plain reference of the grid: per group, scale (max - min) / 15, codes round((w - min) / scale) - 8
    Wg = W.reshape(8, 8, 32)
    lo, hi = Wg.amin(-1), Wg.amax(-1)
    scale, zero = minmax_qparams(W, 4, 32)
    assert torch.allclose(scale, (hi - lo) / 15) and torch.allclose(zero, -8 - lo / scale)
    codes = quantize(W, scale, zero, 4, 32, float_zero=True)
    ref = (torch.round((Wg - lo[..., None]) / scale[..., None]) - 8).reshape(8, 256)
    assert torch.equal(codes.float(), ref)
    with pytest.raises(LlmpressError, match="set sym: false"):
        RTNConfig(bits=4, group_size=32, sym=True, float_zero=True)


def _quantized(model_type, overrides, sym, tok, seed=0):
    """A tiny model whose linears carry RTN int4 group-32 codes, its weights rebuilt with fp16 scales (what the
    GGUF blocks hold), and the per-layer results."""
    model = tiny_model(model_type, seed=seed, vocab_size=len(tok), **overrides)
    cfg = RTNConfig(bits=4, group_size=32, sym=sym, float_zero=not sym)
    results = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            result = rtn(module.weight.data, cfg)
            kind = BLOCK_TYPES["Q4_0" if sym else "Q4_1"]
            data = pack_blocks(result.qweight, result.scale, result.zero, kind)
            module.weight.data = torch.from_numpy(quants.dequantize(data, GGMLQuantizationType[kind.name]).copy())
            results[name] = result
    return model, results


def _unpermute(x, heads):
    rows = x.shape[0]
    return x.reshape(heads, rows // heads // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("model_type, overrides", ARCHS)
@pytest.mark.parametrize("sym", [True, False])
def test_tiny_models_round_trip_through_gguf(calib, tmp_path, model_type, overrides, sym):
    from transformers import AutoModelForCausalLM

    tok, _ = calib
    model, results = _quantized(model_type, overrides, sym, tok)
    report = write_gguf(model, tok, tmp_path / "m.gguf", results=results, embedding="F32", dense="F32",
                        meta={"recipe": "test"})
    kind = "Q4_0" if sym else "Q4_1"
    assert set(report.types[n] for n in report.exact) == {kind} and len(report.exact) == len(results)
    reader = GGUFReader(tmp_path / "m.gguf")
    assert json.loads(reader.fields[META_KEY].contents()) == {"recipe": "test"}
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tensors = {t.name: t for t in reader.tensors}
    q = tensors["blk.1.attn_q.weight"]
    codes, _, _ = unpack_blocks(np.asarray(q.data), BLOCK_TYPES[kind], 64)
    if model_type in ("llama", "mistral"):  # llama.cpp's rotary row order, undone here by hand
        codes = _unpermute(codes, model.config.num_attention_heads)
    assert torch.equal(codes, results["model.layers.1.self_attn.q_proj"].qweight)
    down, _, _ = unpack_blocks(np.asarray(tensors["blk.0.ffn_down.weight"].data), BLOCK_TYPES[kind], 128)
    assert torch.equal(down, results["model.layers.0.mlp.down_proj"].qweight)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.tensor([tok.encode(TOKENIZER_TEXT[:120])])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def test_tokenizer_names_llama_cpp_knows():
    split = {"type": "Split", "pattern": {"Regex": ""}}
    llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    qwen2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    seq = {"type": "Sequence", "pretokenizers": []}
    assert pre_tokenizer_name({"pre_tokenizer": {**seq, "pretokenizers": [
        {**split, "pattern": {"Regex": llama3}}, {"type": "ByteLevel", "use_regex": False}]}}) == "llama-bpe"
    assert pre_tokenizer_name({"pre_tokenizer": {**seq, "pretokenizers": [
        {**split, "pattern": {"Regex": qwen2}}, {"type": "ByteLevel", "use_regex": False}]}}) == "qwen2"
    assert pre_tokenizer_name({"pre_tokenizer": {**seq, "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}}) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}) == "default"


def test_cli_compress_and_export_write_the_same_codes(calib, tmp_path):
    tok, spec = calib
    folder = tmp_path / "model"
    tiny_model("llama", seed=3, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    common = ["--data", spec, "--samples", "4", "--seq-len", "32", "--quiet"]
    assert main(["compress", str(folder), "--recipe", "gptq-q4_0", "--out", str(tmp_path / "direct.gguf"),
                 "--format", "gguf", *common]) == 0
    assert main(["compress", str(folder), "--recipe", "gptq-q4_0", "--out", str(tmp_path / "packed"), *common]) == 0
    assert main(["export", str(tmp_path / "packed"), "--out", str(tmp_path / "exported.gguf")]) == 0
    direct, exported = (GGUFReader(tmp_path / f) for f in ("direct.gguf", "exported.gguf"))
    a, b = ({t.name: np.asarray(t.data) for t in r.tensors} for r in (direct, exported))
    assert a.keys() == b.keys() and direct.tensors[0].name == "token_embd.weight"
    linears = [n for n in a if n.startswith("blk.") and not n.endswith("norm.weight")]
    assert len(linears) == 14 and all(np.array_equal(a[n], b[n]) for n in linears)
    assert {t.tensor_type.name for t in direct.tensors if t.name in linears} == {"Q4_0"}
    assert {t.name: t.tensor_type.name for t in direct.tensors}["token_embd.weight"] == "Q8_0"
    meta = json.loads(direct.fields[META_KEY].contents())
    assert meta["recipe"]["stages"][0]["method"] == "gptq" and len(meta["layers"]) == 14
    # llmpress eval reads the file (through transformers) and counts its tensors as stored: Q4_0 is 4.5 bits
    assert main(["eval", str(tmp_path / "direct.gguf"), "--data", spec, "--seq-len", "32", "--max-windows", "2",
                 "--no-speed", "--quiet", "--json", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["linear_bits_per_weight"] == 4.5 and report["disk_bytes"] == (tmp_path / "direct.gguf").stat().st_size


def test_cli_refusals_are_one_line_and_write_nothing(calib, tmp_path, capsys):
    tok, spec = calib
    folder = tmp_path / "model"
    tiny_model("llama", seed=3, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "m.gguf"
    capsys.readouterr()
    assert main(["compress", str(folder), "--recipe", "rtn-w4-g64", "--format", "gguf", "--out", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "fits no GGUF type" in err and "groups of 64" in err and "--requantize" in err and len(err.splitlines()) == 1
    with pytest.raises(LlmpressError, match="fit no GGUF type, e.g. model.layers.0.self_attn.q_proj: it has groups"):
        result = llmpress.compress(tiny_model("llama", vocab_size=len(tok)), "rtn-w4-g64", tokenizer=tok)
        write_gguf(result.model, tok, out, results=result.results, layers=result.layers)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["model"]
    assert main(["compress", str(folder), "--recipe", "rtn-w4-g64", "--format", "gguf", "--out", str(out),
                 "--requantize", "q4_0", "--quiet"]) == 0
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    assert "re-rounded by llama.cpp's rounding: blk." in capsys.readouterr().out
    assert main(["compress", str(folder), "--recipe", "rtn-q4_0", "--format", "gguf", "--out", str(out),
                 "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(folder), "--out", str(tmp_path / "m.bin")]) == 2
    assert "must end in .gguf" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(gpt2)
    assert main(["export", str(gpt2), "--out", str(tmp_path / "g.gguf")]) == 2
    assert "cannot write gpt2 models as GGUF" in capsys.readouterr().err and not (tmp_path / "g.gguf").exists()
    with pytest.raises(LlmpressError, match="unknown GGUF type 'Q3_X'"):
        write_gguf(tiny_model("llama"), None, tmp_path / "x.gguf", dense="q3_x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "m.gguf", "model"]


@pytest.mark.real
def test_default_model_q4_1_export_is_the_source_file_byte_for_byte(tmp_path):
    """The default model was dequantized from Q4_1 (and a Q8_0 embedding): RTN on llama.cpp's own Q4_1 grid
    recovers every block, so the export is the source's tensors exactly, and its perplexity the base's."""
    from llmpress.models.smollm2 import gguf_path

    result = llmpress.compress("smollm2-135m", "rtn-q4_1", out=tmp_path / "q4_1.gguf", format="gguf")
    assert len(result.gguf.exact) == 210 and result.gguf.rerounded == ["token_embd.weight"]
    ours, source = GGUFReader(result.out), GGUFReader(gguf_path())
    theirs = {t.name: t for t in source.tensors}
    assert len(ours.tensors) == len(source.tensors) == 272
    for t in ours.tensors:
        assert t.tensor_type == theirs[t.name].tensor_type, t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data)), t.name
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert ours.fields[key].contents() == source.fields[key].contents()


@pytest.mark.skipif(not llamacpp.available(), reason=f"llama.cpp's bindings are not installed: {llamacpp.INSTALL}")
@pytest.mark.parametrize("model_type, overrides", ARCHS)
def test_llama_cpp_runs_the_export_with_our_logits(calib, tmp_path, model_type, overrides):
    """llama.cpp loads each architecture's export and its perplexity is the in-memory model's (llama.cpp rounds
    activations to 8 bits in its quantized dot products, hence the tolerance); its own quantizer reads our F32
    export."""
    from llmpress.measure.perplexity import perplexity as in_memory

    tok, _ = calib
    model, results = _quantized(model_type, overrides, True, tok)
    path = write_gguf(model, tok, tmp_path / "q.gguf", results=results, embedding="F32").path
    ids = torch.tensor([tok.encode(TOKENIZER_TEXT)[:64], tok.encode(TOKENIZER_TEXT)[64:128]])
    with torch.no_grad():
        want = model(ids[:1]).logits[0]
    got = llamacpp.logits(path, ids[0].tolist(), n_threads=1)
    # llama.cpp rounds activations to 8 bits in quantized dot products (~0.1 std here); a wrong q/k row order is
    # off by ~3.5 std
    assert (got - want).abs().max() < 0.25 * want.std()
    ours, theirs = in_memory(model, ids)["perplexity"], llamacpp.perplexity(path, ids, n_threads=1)["perplexity"]
    assert theirs == pytest.approx(ours, rel=0.015)
    dense = write_gguf(tiny_model(model_type, vocab_size=len(tok), **overrides), tok, tmp_path / "f32.gguf",
                       dense="F32").path
    made = llamacpp.quantize(dense, tmp_path / "theirs.gguf", "Q4_0", n_threads=1)
    types = {t.name: t.tensor_type.name for t in GGUFReader(made).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    assert llamacpp.perplexity(made, ids, n_threads=1)["perplexity"] < 10 * len(tok)


def test_vllm_marlin_misfits_name_the_layers_its_kernel_cannot_run():
    from llmpress.export.compressed_tensors import Scheme, vllm_marlin_misfits

    # SmolLM2-135M's shapes (out, in): every 576-input layer misfits; down_proj (576 out, 1536 in) fits
    shapes = {"q": (576, 576), "k": (192, 576), "gate": (1536, 576), "down": (576, 1536), "wide": (2048, 2048)}
    w4 = {n: Scheme(4, 64, True) for n in shapes}
    assert vllm_marlin_misfits(shapes, w4) == ["q", "k", "gate"]
    assert vllm_marlin_misfits({"wide": (2048, 2048)}, {"wide": Scheme(4, 256, True)}) == ["wide"]
    assert vllm_marlin_misfits({"wide": (2048, 2048)}, {"wide": Scheme(3, 128, True)}) == ["wide"]


def test_mixed_recipe_is_written_per_tensor_and_reloads(calib, tmp_path):
    """A recipe with per-layer overrides (what ``llmpress auto`` writes) keeps each layer's own type in GGUF."""
    from transformers import AutoModelForCausalLM

    from llmpress.recipe import Recipe

    tok, spec = calib
    recipe = Recipe.from_dict({"stages": [{"method": "gptq", "args": {"bits": 4, "group_size": 32},
                                           "overrides": [{"targets": ["*.self_attn.v_proj", "*.mlp.down_proj"],
                                                          "args": {"bits": 8}},
                                                         {"targets": ["*.mlp.up_proj"],
                                                          "args": {"bits": 5, "sym": False}}]}]}, name="mixed")
    result = llmpress.compress(tiny_model("llama", seed=4, vocab_size=len(tok)), recipe, tokenizer=tok, data=spec,
                               samples=4, seq_len=32, out=tmp_path / "mixed.gguf", format="gguf",
                               gguf={"embedding": "F32"})
    types = {t.name: t.tensor_type.name for t in GGUFReader(result.out).tensors}
    assert types["blk.1.attn_v.weight"] == types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.ffn_up.weight"] == "Q5_1" and types["blk.1.attn_q.weight"] == "Q4_0"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="mixed.gguf", dtype=torch.float32)
    ids = torch.tensor([tok.encode(TOKENIZER_TEXT[:120])])
    ours, theirs = result.model.state_dict(), loaded.state_dict()
    for name in [n for n in ours if n.endswith("proj.weight")]:  # fp16 scales in the file, fp32 in memory
        assert (ours[name] - theirs[name]).abs().max() <= ours[name].abs().max() * 2 ** -10, name
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, result.model(ids).logits, atol=5e-2, rtol=0)


# ---- K-quants (Q4_K, Q6_K): super-blocks of 256 whose group scales are an fp16 times small integers ----

KQ = {"Q4_K": (4, 32, 63), "Q6_K": (6, 16, 127)}  # bits, group, largest sub-scale


def _kquant_weights(rows=6, cols=512, seed=0):
    """Random weights with the corner cases of a super-block: all zero, all positive, one constant negative group."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    W[0, :256] = 0
    W[1, 256:] = W[1, 256:].abs()
    W[2, 32:64] = -0.03
    W[3, :256] *= 40  # a super-block far larger than the others in its row
    return W


def _ours(codes, scale, zero, group):
    """(c - z) * s, written out here: each group's scale and zero over its columns."""
    s = scale.repeat_interleave(group, dim=1)
    z = zero.repeat_interleave(group, dim=1)
    return (codes.float() - z) * s


@pytest.mark.parametrize("name", list(K_TYPES))
def test_kquant_blocks_dequantize_in_the_gguf_package_to_our_weights(name):
    """Q6_K: bit for bit; Q4_K: within the fp32 rounding of the float zero point (a few ulps of (|c - z| + 16) s),
    which llama.cpp never forms (it computes d sc q - dmin m)."""
    bits, group, top = KQ[name]
    kind = K_TYPES[name]
    W = _kquant_weights()
    scale, zero = kquant_qparams(W, name)
    codes = quantize(W, scale, zero, bits, group, float_zero=True)
    data = pack_blocks(codes, scale, zero, kind)
    assert data.shape == (6, 2 * kind.nbytes) and kind.nbytes == {"Q4_K": 144, "Q6_K": 210}[name]
    got = torch.from_numpy(quants.dequantize(data, GGMLQuantizationType[name]).copy())
    want = _ours(codes, scale, zero, group)
    if name == "Q6_K":
        assert torch.equal(got, want)
    else:
        ulps = ((got - want).abs() / (((codes.float() - zero.repeat_interleave(group, 1)).abs() + 16)
                                      * scale.repeat_interleave(group, 1) * 2.0 ** -24))
        assert float(ulps.max()) <= 4
    # the stored integers, read back: codes bit for bit, d * sc the scales exactly, dmin * m the offsets
    back, d, sc, dmin, m = unpack_kquant(data, kind, 512)
    assert torch.equal(back, codes)
    assert torch.equal(d.repeat_interleave(256 // group, dim=1) * sc, scale)
    assert int(sc.min()) >= 1 and int(sc.max()) <= top
    offset = dmin.repeat_interleave(256 // group, dim=1) * m
    if name == "Q4_K":  # (8 + z) s, from the fp32 zero point: within its rounding
        assert torch.allclose(offset, (zero + 8) * scale, rtol=1e-6, atol=0) and int(m.max()) <= 63
    else:
        assert not bool(offset.any()) and not bool(zero.any())
    # scales off the grid (one rounded to bf16) are refused, not written wrong
    bad = scale.clone()
    bad[1, 3] = bad[1, 3].bfloat16().float() * (1 + 2 ** -9)
    with pytest.raises(ValueError, match=f"not on the {name} grid"):
        pack_blocks(codes, bad, zero, kind)


def _reference_kquant(W, name):
    """ggml's quantize_row_q4_K_ref / q6_K_ref scale choice, plainly: a loop over rows and super-blocks."""
    bits, group, top = KQ[name]
    rows, cols = W.shape
    scale = np.zeros((rows, cols // group), np.float32)
    zero = np.zeros((rows, cols // group), np.float32)
    x = W.numpy().astype(np.float32)
    for r in range(rows):
        for b in range(cols // 256):
            blk = x[r, 256 * b:256 * (b + 1)].reshape(-1, group)
            lo = np.minimum(blk.min(axis=1), np.float32(0))
            if name == "Q6_K":
                s = np.maximum(-lo, blk.max(axis=1)) / np.float32(31.5)
            else:
                s = (blk.max(axis=1) - lo) / np.float32(15)
            d = np.float32(np.float16(s.max() / np.float32(top)))
            d = d if d > 0 else np.float32(2.0 ** -24)
            sc = np.clip(np.rint(s / d), 1, top)
            if s.max() > 0:
                assert sc.max() == top  # the guarantee the packer relies on
            sl = slice(b * len(s), (b + 1) * len(s))
            scale[r, sl] = d * sc
            if name == "Q4_K":
                dmin = np.float32(np.float16((-lo).max() / np.float32(63)))
                m = np.clip(np.rint(-lo / dmin), 0, 63) if dmin > 0 else np.zeros_like(lo)
                zero[r, sl] = np.float32(-8) + (dmin * m).astype(np.float32) / scale[r, sl]
    return torch.from_numpy(scale), torch.from_numpy(zero)


@pytest.mark.parametrize("name", list(K_TYPES))
def test_kquant_qparams_match_a_plain_per_super_block_loop(name):
    W = _kquant_weights(seed=1)
    W[0, :256] = torch.randn(256) * 0.05  # all-zero super-blocks take the smallest fp16 d, left out of the loop
    scale, zero = kquant_qparams(W, name)
    ref_scale, ref_zero = _reference_kquant(W, name)
    assert torch.equal(scale, ref_scale)
    assert torch.allclose(zero, ref_zero, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="whole super-blocks of 256"):
        kquant_qparams(torch.zeros(2, 576), name)


@pytest.mark.parametrize("name", list(K_TYPES))
def test_rtn_kquant_packs_to_what_llama_cpp_dequantizes(name):
    bits, group, _ = KQ[name]
    W = _kquant_weights(seed=2)
    result = rtn(W, RTNConfig(kquant=name))  # bits, group_size and sym are set by kquant
    grid = result.grid
    assert (grid.bits, grid.group_size, grid.sym, grid.kquant) == (bits, group, name == "Q6_K", name)
    assert Grid.of(result.record()) == grid and result.record()["kquant"] == name
    kind = block_type_for(grid, 512)
    assert kind is K_TYPES[name]
    got = torch.from_numpy(quants.dequantize(pack_blocks(result.qweight, result.scale, result.zero, kind),
                                             GGMLQuantizationType[name]).copy())
    assert torch.allclose(got, result.weight, rtol=0, atol=1e-6) if name == "Q4_K" else torch.equal(got, result.weight)
    # a real rounding: the relative error of 4- and 6-bit grids
    assert float((result.weight - W).norm() / W.norm()) < {"Q4_K": 0.12, "Q6_K": 0.03}[name]
    # rows that are not whole super-blocks get llama.cpp's fallback type (llama-quantize: Q4_K -> Q5_0, Q6_K -> Q8_0)
    narrow = rtn(torch.randn(4, 576), RTNConfig(kquant=name))
    assert narrow.grid.kquant is None
    assert block_type_for(narrow.grid, 576).name == {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[name]
    assert "not a multiple of 256" in why_not(grid, 576)


def test_kquant_configs_refuse_grids_that_disagree():
    assert RTNConfig(bits=4, group_size=32, sym=False, kquant="Q4_K").group_size == 32
    with pytest.raises(LlmpressError, match="kquant Q4_K is 4-bit asymmetric groups of 32: set bits: 4"):
        RTNConfig(bits=8, kquant="Q4_K")
    with pytest.raises(LlmpressError, match="kquant Q6_K is 6-bit symmetric groups of 16"):
        GPTQConfig(bits=4, group_size=32, kquant="Q6_K")
    with pytest.raises(LlmpressError, match="set mse: false"):
        RTNConfig(kquant="Q4_K", mse=True)
    with pytest.raises(LlmpressError, match="kquant='Q5_K' is invalid"):
        RTNConfig(kquant="Q5_K")
    assert GPTQConfig(kquant="Q6_K").bits == 6


@pytest.mark.parametrize("name", list(K_TYPES))
def test_gptq_kquant_rounds_float_zero_points_and_packs(name):
    bits, group, _ = KQ[name]
    g = torch.Generator().manual_seed(3)
    W = torch.randn(8, 512, generator=g) * 0.05
    X = torch.randn(1024, 512, generator=g) @ (torch.eye(512) + torch.randn(512, 512, generator=g) / 40)
    H = 2 / X.shape[0] * X.T @ X  # symmetric positive definite
    for act_order in (False, True):
        result = gptq(W, H, GPTQConfig(kquant=name, act_order=act_order))
        assert result.grid.kquant == name
        scale, zero = kquant_qparams(W, name)  # static: from the original W
        assert torch.equal(result.scale, scale) and torch.equal(result.zero, zero)
        assert torch.equal(result.weight, dequantize(result.qweight, scale, zero, group))
        data = pack_blocks(result.qweight, result.scale, result.zero, K_TYPES[name])
        got = torch.from_numpy(quants.dequantize(data, GGMLQuantizationType[name]).copy())
        assert torch.allclose(got, result.weight, rtol=0, atol=1e-6)
        # GPTQ beats RTN on the same grid in its own objective tr(D H D^T)
        rtn_w = rtn(W, RTNConfig(kquant=name)).weight
        err = [float(torch.einsum("ij,jk,ik->", D, H, D)) for D in (W - result.weight, W - rtn_w)]
        assert err[0] < 0.9 * err[1]
    # no error to spread (H = I): GPTQ is RTN, code for code; round(w / s) + z would be off for float zero points
    plain = gptq(W, torch.eye(512), GPTQConfig(kquant=name))
    assert torch.equal(plain.qweight, rtn(W, RTNConfig(kquant=name)).qweight)


def test_kquant_tiny_model_round_trips_through_gguf_and_llama_cpp(calib, tmp_path):
    """A llama whose linears are 256 and 512 wide: Q4_K codes (Q6_K for down_proj), written, reloaded by
    transformers with the in-memory logits, and run by llama.cpp when its bindings are installed."""
    from transformers import AutoModelForCausalLM

    tok, _ = calib
    model = tiny_model("llama", seed=5, vocab_size=len(tok), hidden_size=256, intermediate_size=512, head_dim=64)
    results = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            kind = "Q6_K" if name.endswith("down_proj") else "Q4_K"
            result = rtn(module.weight.data, RTNConfig(kquant=kind))
            data = pack_blocks(result.qweight, result.scale, result.zero, K_TYPES[kind])
            module.weight.data = torch.from_numpy(quants.dequantize(data, GGMLQuantizationType[kind]).copy())
            results[name] = result
    path = tmp_path / "k.gguf"
    report = write_gguf(model, tok, path, results=results, embedding="F32", dense="F32")
    assert len(report.exact) == len(results) == 14 and report.file_type == "Q4_K"
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.1.ffn_down.weight"] == "Q6_K"
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    down, *_ = unpack_kquant(np.asarray(tensors["blk.0.ffn_down.weight"].data), K_TYPES["Q6_K"], 512)
    assert torch.equal(down, results["model.layers.0.mlp.down_proj"].qweight)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="k.gguf", dtype=torch.float32)
    ids = torch.tensor([tok.encode(TOKENIZER_TEXT[:120])])
    with torch.no_grad():
        want = model(ids).logits
        assert torch.allclose(loaded(ids).logits, want, atol=1e-4, rtol=0)
    if llamacpp.available():  # llama.cpp rounds activations to 8 bits in quantized dot products: a tolerance
        got = llamacpp.logits(path, ids[0].tolist(), n_threads=1)
        assert (got - want[0]).abs().max() < 0.25 * want[0].std()


def test_kquant_sizes_and_a_saved_q6_k_folder_exports_its_own_codes(calib, tmp_path):
    from llmpress.measure.size import layer_bytes

    q4k = {"shape": [8, 512], **Grid(4, 32, False, float_zero=True, kquant="Q4_K").to_record()}
    q6k = {"shape": [8, 512], **Grid(6, 16, True, kquant="Q6_K").to_record()}
    assert layer_bytes(q4k) == 8 * 2 * 144 and layer_bytes(q6k) == 8 * 2 * 210  # ggml's block sizes
    tok, spec = calib
    folder = tmp_path / "model"
    tiny_model("llama", vocab_size=len(tok), hidden_size=256, intermediate_size=512, head_dim=64).save_pretrained(
        folder)
    tok.save_pretrained(folder)
    assert main(["compress", str(folder), "--recipe", "rtn-q6_k", "--out", str(tmp_path / "q6k"), "--quiet"]) == 0
    assert main(["compress", str(folder), "--recipe", "rtn-q6_k", "--out", str(tmp_path / "direct.gguf"),
                 "--format", "gguf", "--quiet"]) == 0
    assert main(["export", str(tmp_path / "q6k"), "--out", str(tmp_path / "exported.gguf")]) == 0
    direct, exported = ({t.name: t for t in GGUFReader(tmp_path / f).tensors} for f in ("direct.gguf", "exported.gguf"))
    assert direct["blk.0.attn_q.weight"].tensor_type.name == "Q6_K"
    for name, t in direct.items():
        if name.startswith("blk.") and not name.endswith("norm.weight"):
            assert np.array_equal(np.asarray(t.data), np.asarray(exported[name].data)), name

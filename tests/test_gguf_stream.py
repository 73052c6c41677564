"""GGUF files read one tensor at a time (``llmpress.models.gguf_checkpoint``): the values transformers' GGUF
loader gives, to the bit, for every parameter; compress, eval and plan from a .gguf file block by block give what
the whole-model load gives, and a killed run from a .gguf resumes byte-identical."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from gguf import GGMLQuantizationType, quants
from safetensors.torch import load_file

from llmpress import api
from llmpress.export.gguf import load_gguf
from llmpress.export.gguf_blocks import BLOCK_TYPES, pack_blocks
from llmpress.export.gguf_write import write_gguf
from llmpress.models.gguf_checkpoint import GgufCheckpoint, _names
from llmpress.models.lazy import check_names, skeleton
from llmpress.quant.rtn import RTNConfig, rtn
from test_stream import _run
from tiny_models import tiny_model

ARCHS = [("llama", {}), ("mistral", {"sliding_window": None}), ("qwen2", {}), ("qwen3", {"head_dim": 128})]


def _gguf(path, tok, model_type="llama", dense="F16", **overrides):
    """A tiny model written as GGUF: its linears Q4_0 (their weights the dequantized codes) but block 0's
    down_proj, in ``dense``; the embedding and the untied head Q8_0; norms F32."""
    model = tiny_model(model_type, vocab_size=len(tok), num_hidden_layers=3, tie_word_embeddings=False, **overrides)
    results = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in ("lm_head", "model.layers.0.mlp.down_proj"):
            result = rtn(module.weight.data, RTNConfig(bits=4, group_size=32, sym=True))
            data = pack_blocks(result.qweight, result.scale, result.zero, BLOCK_TYPES["Q4_0"])
            module.weight.data = torch.from_numpy(quants.dequantize(data, GGMLQuantizationType.Q4_0).copy())
            results[name] = result
    write_gguf(model, tok, path, results=results, dense=dense, embedding="Q8_0")
    return path


def _tensors(folder):
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


@pytest.mark.parametrize("model_type, overrides", ARCHS)
@pytest.mark.parametrize("dense", ["F16", "BF16", "F32"])
def test_every_tensor_is_what_the_whole_load_gives(calib, tmp_path, model_type, overrides, dense):
    tok, _ = calib
    path = _gguf(tmp_path / "m.gguf", tok, model_type, dense, **overrides)
    whole, _ = load_gguf(path)
    checkpoint = GgufCheckpoint(path)
    state = whole.state_dict()
    assert set(checkpoint.names()) == set(state) and checkpoint.one_to_one
    assert check_names(skeleton(checkpoint.config), checkpoint) is None
    kinds = {checkpoint.kind(n) for n in checkpoint.names()}
    assert {"Q4_0", "Q8_0", "F32", dense} <= kinds
    for name, expected in state.items():
        got = checkpoint.get(name, torch.float32)
        assert torch.equal(got, expected), name  # llama's q/k rows un-permuted, every block type dequantized
        kind = checkpoint.kind(name)
        own = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(kind, torch.float32)
        assert checkpoint.dtype(name) == own and checkpoint.get(name).dtype == own, name  # stored dtype, else fp32
        assert checkpoint.nbytes(name) == expected.numel() * own.itemsize
    assert checkpoint.float_dtype() == torch.float32  # most bytes are block-quantized: read in float32
    # our name map is transformers' (without its walk over every submodule)
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    model = skeleton(checkpoint.config)
    assert _names(checkpoint.arch, model, checkpoint.config) == get_gguf_hf_weights_map(model, TensorProcessor())


@pytest.mark.parametrize("recipe", ["rtn-w4-g64", "gptq-w4-g64"])
def test_streamed_from_gguf_equals_the_whole_load(calib, tmp_path, recipe):
    tok, data = calib
    path = _gguf(tmp_path / "m.gguf", tok)
    kw = dict(data=data, samples=4, seq_len=32)
    streamed = api.compress(str(path), recipe, out=tmp_path / "s", stream="on", **kw)
    whole = api.compress(str(path), recipe, out=tmp_path / "w", stream="off", **kw)
    assert streamed.in_memory is None and whole.in_memory is not None
    a, b = _tensors(tmp_path / "s"), _tensors(tmp_path / "w")
    assert set(a) == set(b) and any(k.endswith("weight_packed") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    ma, mb = (json.loads((tmp_path / f / "llmpress.json").read_text()) for f in ("s", "w"))
    assert ma["layers"] == mb["layers"] and ma["streamed"]
    assert "loaded from GGUF: weights are dequantized" in ma["notes"]


def test_streamed_eval_and_plan_of_a_gguf_file(calib, tmp_path):
    tok, data = calib
    path = _gguf(tmp_path / "m.gguf", tok)
    kw = dict(seq_len=32, max_windows=3, measure_speed=False)
    streamed = api.evaluate(str(path), data, stream=True, **kw)
    whole = api.evaluate(str(path), data, stream=False, **kw)
    assert streamed["perplexity"] == whole["perplexity"] and streamed["streamed"]  # to the last bit
    for key in ("size_bytes", "bits_per_weight", "disk_bytes", "params", "compression_ratio"):
        assert streamed[key] == whole[key], key
    plan = api.plan(str(path), "rtn-w4-g64")
    assert plan.blocks == 3 and plan.streamed and plan.disk_bytes > 0 and plan.seconds > 0


def test_a_killed_run_from_a_gguf_file_resumes_byte_identical(calib, tmp_path):
    tok, data = calib
    path = _gguf(tmp_path / "m.gguf", tok)
    args = ["compress", str(path), "--recipe", "gptq-w4-g64", "--data", data, "--samples", "4", "--seq-len", "32",
            "--quiet"]
    assert _run([*args, "--out", str(tmp_path / "full")]).returncode == 0
    killed = _run([*args, "--out", str(tmp_path / "again")], kill_after=1)
    assert killed.returncode == -signal.SIGKILL and (tmp_path / ".again.partial").is_dir()
    resumed = _run([*args, "--out", str(tmp_path / "again")])
    assert resumed.returncode == 0, resumed.stderr
    for file in sorted((tmp_path / "full").glob("*.safetensors")):
        assert file.read_bytes() == (tmp_path / "again" / file.name).read_bytes(), file.name


@pytest.mark.real
def test_default_model_streams_from_its_gguf_as_from_its_folder(tmp_path):
    """The default model's GGUF file (Q4_1 linears, Q8_0 embedding) streamed: the shards are byte for byte those
    streamed from the folder it is converted to (the alias)."""
    from llmpress.models.smollm2 import gguf_path

    api.compress(str(gguf_path()), "rtn-w4-g64", out=tmp_path / "g", stream="on")
    api.compress("smollm2-135m", "rtn-w4-g64", out=tmp_path / "f", stream="on")
    shards = sorted(p.name for p in (tmp_path / "f").glob("*.safetensors"))
    assert len(shards) == 31 and shards == sorted(p.name for p in (tmp_path / "g").glob("*.safetensors"))
    for name in shards:
        assert (tmp_path / "g" / name).read_bytes() == (tmp_path / "f" / name).read_bytes(), name

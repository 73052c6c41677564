"""Streamed compression (``llmpress.stream``): one block in memory, written as it goes, resumable after SIGKILL.

The streamed run must write exactly what the in-memory run writes (same tensors, config and records), keep
a bfloat16 checkpoint's dtype for what stays dense, and, killed after any block and started again with the
same command, produce the same bytes as an uninterrupted run; another command on the same ``--out`` is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmpress import api
from llmpress.errors import LlmpressError
from llmpress.models.lazy import Checkpoint, materialize, release, skeleton, tied_names
from tiny_models import tiny_model

LAYERS = 4


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, calib):
    """A tiny Llama saved sharded in float32 and in bfloat16 (tied head), with a tokenizer and calibration text."""
    root = tmp_path_factory.mktemp("stream")
    tok, data = calib
    model = tiny_model("llama", num_hidden_layers=LAYERS, vocab_size=len(tok), tie_word_embeddings=True)
    folders = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        folder = root / name
        model.to(dtype).save_pretrained(folder, max_shard_size="20KB")
        tok.save_pretrained(folder)
        folders[name] = folder
    return folders, data, root


def test_lazy_block_equals_whole_load(checkpoints):
    folders, _, _ = checkpoints
    from transformers import AutoConfig, AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(folders["bf16"], dtype=torch.float32)
    model = skeleton(AutoConfig.from_pretrained(folders["bf16"]))
    checkpoint = Checkpoint(folders["bf16"])
    assert len(checkpoint.files) > 1 and checkpoint.float_dtype() == torch.bfloat16
    assert tied_names(model) == {"lm_head.weight": "model.embed_tokens.weight"}
    block = materialize(model, "model.layers.1", checkpoint, torch.float32)
    for name, param in block.named_parameters():
        assert torch.equal(param, whole.get_parameter(f"model.layers.1.{name}")), name
    release(block, model)
    assert all(p.is_meta for p in block.parameters())
    materialize(model, "model.embed_tokens", checkpoint, torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied head follows the embedding


@pytest.mark.parametrize("recipe", ["rtn-w4-g64", "gptq-w4-g64", "wanda-50"])
def test_streamed_equals_in_memory(checkpoints, tmp_path, recipe):
    folders, data, _ = checkpoints
    kw = dict(data=data, samples=4, seq_len=32)
    streamed = api.compress(str(folders["fp32"]), recipe, out=tmp_path / "s", stream="on", **kw)
    whole = api.compress(str(folders["fp32"]), recipe, out=tmp_path / "m", stream="off", **kw)
    a, b = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert len(list((tmp_path / "s").glob("model-*.safetensors"))) == LAYERS + 1  # a shard per block, then the rest
    ca, cb = (json.loads((tmp_path / f / "config.json").read_text()) for f in ("s", "m"))
    assert ca == cb
    ma, mb = (json.loads((tmp_path / f / "llmpress.json").read_text()) for f in ("s", "m"))
    assert ma["layers"] == mb["layers"] and ma["blocks"] == mb["blocks"] and ma["streamed"]
    assert streamed.in_memory is None
    ppl = [api.evaluate(r, data, seq_len=32, max_windows=2, measure_speed=False)["perplexity"]
           for r in (streamed, whole)]
    assert ppl[0] == ppl[1]


def test_bf16_checkpoint_stays_bf16(checkpoints, tmp_path):
    folders, data, _ = checkpoints
    api.compress(str(folders["bf16"]), "sparsegpt-50", out=tmp_path / "p", data=data, samples=4, seq_len=32)
    tensors = _tensors(tmp_path / "p")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    assert size == Checkpoint(folders["bf16"]).total_bytes()  # as large as the bf16 base, not twice it
    api.compress(str(folders["bf16"]), "rtn-w4-g64", out=tmp_path / "q")
    scales = {k: t.dtype for k, t in _tensors(tmp_path / "q").items() if k.endswith("weight_scale")}
    assert scales and set(scales.values()) == {torch.bfloat16}
    loaded = api.load_model(tmp_path / "q")
    assert loaded.meta["streamed"] and loaded.meta["layers"]


def test_lone_quantizer_reads_blocks_in_the_calibration_dtype(checkpoints, tmp_path, monkeypatch):
    """A bf16 checkpoint calibrated in bf16 by GPTQ alone: blocks read in bf16 write the bytes that float32 blocks
    (and their bf16 copies for the passes) write; anything else keeps float32 blocks."""
    from llmpress import stream
    from llmpress.recipe import load_recipe

    folders, data, _ = checkpoints
    gptq = {"method": "gptq", "args": {"bits": 4, "group_size": 16, "act_order": True, "true_sequential": True}}
    recipe = {"calibration": {"dtype": "bfloat16"}, "stages": [gptq]}
    seen = []
    real = stream.materialize
    monkeypatch.setattr(stream, "materialize", lambda model, prefix, checkpoint, dtype, *a, **k: (
        seen.append(dtype) if ".layers." in prefix else None, real(model, prefix, checkpoint, dtype, *a, **k))[1])
    kw = dict(data=data, samples=4, seq_len=32, stream="on")
    bf16 = api.compress(str(folders["bf16"]), recipe, out=tmp_path / "b", **kw)
    assert seen and set(seen) == {torch.bfloat16}
    monkeypatch.setattr(stream, "block_dtype", lambda *_: torch.float32)
    fp32 = api.compress(str(folders["bf16"]), recipe, out=tmp_path / "f", **kw)
    a, b = _tensors(tmp_path / "b"), _tensors(tmp_path / "f")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert bf16.meta["layers"].keys() == fp32.meta["layers"].keys()
    for name, meta in bf16.meta["layers"].items():  # the errors see the stored weight, rounded to bf16
        assert meta["output_error"] == pytest.approx(fp32.meta["layers"][name]["output_error"], rel=0.02)

    checkpoint = {name: Checkpoint(folder) for name, folder in folders.items()}
    monkeypatch.undo()
    dtype = stream.block_dtype
    assert dtype(load_recipe(recipe), checkpoint["bf16"], torch.bfloat16) == torch.bfloat16
    assert dtype(load_recipe(recipe), checkpoint["fp32"], torch.bfloat16) == torch.float32  # not the stored dtype
    assert dtype(load_recipe(recipe), checkpoint["bf16"], torch.float32) == torch.float32
    two = {"calibration": {"dtype": "bfloat16"}, "stages": [{"method": "wanda", "args": {"sparsity": 0.5}}, gptq]}
    assert dtype(load_recipe(two), checkpoint["bf16"], torch.bfloat16) == torch.float32  # a stage reads another's


def test_stream_on_refuses_what_needs_the_whole_model(checkpoints, tmp_path):
    folders, _, _ = checkpoints
    with pytest.raises(LlmpressError, match="distill.*stream off"):
        api.compress(str(folders["fp32"]), "gptq-w4-g64+distill", out=tmp_path / "x", stream="on")
    assert not list(tmp_path.iterdir())


KILLER = textwrap.dedent("""
    import os, signal, sys
    from llmpress import cli, stream
    after = int(os.environ["KILL_AFTER"])
    record = stream.Staging.record
    def killing(self, done, *args, **kwargs):
        record(self, done, *args, **kwargs)
        if done == after:
            os.kill(os.getpid(), signal.SIGKILL)
    stream.Staging.record = killing
    sys.exit(cli.main(sys.argv[1:]))
""")


def _run(args: list[str], kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AFTER": str(-1 if kill_after is None else kill_after)}
    return subprocess.run([sys.executable, "-c", KILLER, *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_sigkill_then_same_command_resumes_byte_identical(checkpoints, tmp_path):
    folders, data, _ = checkpoints
    args = ["compress", str(folders["bf16"]), "--recipe", "gptq-w4-g64", "--data", data, "--samples", "4",
            "--seq-len", "32", "--quiet"]
    full = _run([*args, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    out = tmp_path / "resumed"
    killed = _run([*args, "--out", str(out)], kill_after=2)
    assert killed.returncode == -signal.SIGKILL
    partial = tmp_path / ".resumed.partial"
    assert not out.exists() and json.loads((partial / "progress.json").read_text())["done"] == 2
    other = _run(["compress", str(folders["bf16"]), "--recipe", "rtn-w4-g64", "--out", str(out), "--quiet"])
    assert other.returncode == 2 and "unfinished run of another command" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    again = _run([*args, "--out", str(out)])
    assert again.returncode == 0, again.stderr
    assert not partial.exists()
    files = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert files == sorted(p.name for p in out.iterdir())
    for name in files:
        if name == "llmpress.json":
            continue
        assert (tmp_path / "full" / name).read_bytes() == (out / name).read_bytes(), name
    ma, mb = (json.loads((f / "llmpress.json").read_text()) for f in (tmp_path / "full", out))
    assert ma["layers"] == mb["layers"] and ma["blocks"] == mb["blocks"]
    assert "resumed after a kill" in mb["notes"]


def test_a_run_killed_before_its_first_block_is_started_over(checkpoints, tmp_path):
    """A staging folder with no block written (no progress record, its process gone) holds nothing to resume:
    any command takes it over instead of asking the user to delete it."""
    folders, _, _ = checkpoints
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    partial = tmp_path / ".q.partial"
    (partial / "spill").mkdir(parents=True)
    (partial / "lock").write_text(gone.stdout.strip())
    (partial / "spill" / "0.bin").write_bytes(b"x" * 16)
    api.compress(str(folders["bf16"]), "rtn-w4-g64", out=tmp_path / "q", stream="on")
    assert (tmp_path / "q" / "config.json").is_file() and not partial.exists()


def test_plan_predicts_and_compress_refuses_what_does_not_fit(checkpoints, tmp_path, monkeypatch):
    folders, data, _ = checkpoints
    from llmpress import plan as planning
    from llmpress.cli import main

    found = api.plan(str(folders["bf16"]), "gptq-w4-g64", data=data, samples=4, seq_len=32)
    assert found.blocks == LAYERS and found.streamed and found.samples == 4
    assert found.peak_ram_bytes > 0 and found.disk_bytes > 0 and found.seconds > 0
    assert len(found.probe["probes"]) == 2 and found.fits() is None
    # the disk estimate: a probe block's shard per block, plus what is not in blocks
    ckpt = Checkpoint(folders["bf16"])
    assert found.disk_bytes >= ckpt.total_bytes() - ckpt.total_bytes("model.layers.")
    monkeypatch.setattr(planning, "available_memory", lambda: 1000)
    monkeypatch.setattr(planning, "current_rss", lambda: 0)
    code = main(["compress", str(folders["bf16"]), "--recipe", "rtn-w4-g64", "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2 and not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_threads_by_size():
    from llmpress.linalg import MANY_THREADS_ELEMENTS, single_threaded

    before = torch.get_num_threads()
    with single_threaded(16):
        assert torch.get_num_threads() == 1
    with single_threaded(MANY_THREADS_ELEMENTS):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before

"""Streamed evaluation (``llmpress.measure.streamed``, ``llmpress eval --stream``): a model read one block at a time
gives the whole model's perplexity to the last bit, and the same size and FLOPs report.

Tiny random models saved sharded (``max_shard_size="50KB"``: an index and several files), dense or
pack-quantized, tied and untied heads; every comparison is ``==`` on the float.
"""

import json

import pytest
import torch

import llmpress
from llmpress import evaluate
from llmpress.cli import main
from llmpress.errors import LlmpressError
from llmpress.export.compressed_tensors import dense_tensors
from llmpress.measure import perplexity
from llmpress.measure import streamed as streamed_module
from llmpress.measure.streamed import open_folder, streamed_perplexity
from llmpress.models.lazy import Checkpoint
from llmpress.models.loader import load_model
from llmpress.recipe import load_recipe
from tiny_models import random_ids, tiny_model

WINDOWS = {"seq_len": 32, "max_windows": 3, "measure_speed": False}
ONLY_WHOLE = {"notes", "peak_memory_bytes", "streamed"}  # what a streamed report may differ in


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, calib):
    """A folder for the tiny models, and conftest's tokenizer and text spec."""
    tok, data = calib
    return tmp_path_factory.mktemp("streamed"), tok, data


def _saved(root, tok, name: str, model) -> str:
    folder = root / name
    if not folder.exists():
        model.save_pretrained(folder, max_shard_size="50KB")
        tok.save_pretrained(folder)
    return str(folder)


def _llama(tiny, tie: bool) -> str:
    root, tok, _ = tiny
    return _saved(root, tok, f"llama-{'tied' if tie else 'untied'}",
                  tiny_model("llama", vocab_size=len(tok), tie_word_embeddings=tie))


def _same_reports(whole: dict, streamed: dict) -> None:
    assert streamed["streamed"] is True and "streamed" not in whole
    assert set(whole) | {"streamed"} == set(streamed)
    differ = {k for k in whole if whole[k] != streamed[k]}
    assert differ <= ONLY_WHOLE, differ


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_streamed_perplexity_equals_the_whole_model_to_the_last_bit(tiny, tie):
    folder = _llama(tiny, tie)
    assert (Checkpoint(folder).folder / "model.safetensors.index.json").is_file()
    assert len(Checkpoint(folder).files) > 2  # sharded: blocks are read across files
    windows = random_ids(3, 24, seed=1)
    whole = perplexity(load_model(folder).model, windows)
    streamed = open_folder(folder)
    result = streamed_perplexity(streamed, windows)
    assert result["perplexity"] == whole["perplexity"] and result["loss"] == whole["loss"]
    assert result["tokens"] == whole["tokens"] == 3 * 23
    assert all(p.is_meta for p in streamed.model.parameters())  # everything released again
    assert (streamed.model.lm_head.weight is streamed.model.model.embed_tokens.weight) == tie


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_evaluate_stream_reports_what_the_whole_load_reports(tiny, tie):
    folder, data = _llama(tiny, tie), tiny[2]
    whole = evaluate(folder, data, stream=False, **WINDOWS)
    streamed = evaluate(folder, data, stream=True, **WINDOWS)
    _same_reports(whole, streamed)  # perplexity, size, params (non-zero counts), FLOPs: all equal
    assert streamed["perplexity"] == whole["perplexity"]


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "gemma3_text", "qwen3"])
def test_other_architectures_stream_exactly(tiny, model_type):
    root, tok, _ = tiny
    folder = _saved(root, tok, model_type, tiny_model(model_type, vocab_size=len(tok)))
    windows = random_ids(2, 20, seed=2)
    whole = perplexity(load_model(folder).model, windows)["perplexity"]
    assert streamed_perplexity(open_folder(folder), windows)["perplexity"] == whole


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_pack_quantized_folder_streams_to_the_whole_loads_perplexity(tiny, tmp_path, tie):
    folder, data = _llama(tiny, tie), tiny[2]
    out = tmp_path / "w4"
    llmpress.compress(folder, "rtn-w4-g64", out=out)
    packed = [n for n in Checkpoint(out).names() if n.endswith(".weight_packed")]
    assert len(packed) == 14  # every block linear: dequantized one layer at a time when streamed
    _same_reports(evaluate(str(out), data, stream=False, **WINDOWS), evaluate(str(out), data, stream=True, **WINDOWS))


def test_quantized_tied_embedding_and_mixed_groups_stream_exactly(tiny, tmp_path):
    """Two config groups (llmpress's own reader, ``dense_state_dict`` when whole) and a packed embedding that is
    also the head."""
    root, tok, data = tiny
    stages = [{"method": "embedding", "args": {"bits": 4, "group_size": 32, "sym": False}},
              {"method": "rtn", "args": {"bits": 4, "group_size": 32}}]
    model = tiny_model("llama", vocab_size=len(tok), tie_word_embeddings=True)
    llmpress.compress(model, load_recipe({"stages": stages}), tokenizer=tok, out=tmp_path / "q")
    assert "model.embed_tokens.weight_packed" in Checkpoint(tmp_path / "q")
    _same_reports(evaluate(str(tmp_path / "q"), data, stream=False, **WINDOWS),
                  evaluate(str(tmp_path / "q"), data, stream=True, **WINDOWS))


def test_dense_tensors_reads_one_prefix_as_the_whole_reader_does(tiny, tmp_path):
    folder = _llama(tiny, True)
    out = llmpress.compress(folder, "rtn-w4-g64-asym", out=tmp_path / "w4a").out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    whole = dense_tensors(Checkpoint(out), config, "", torch.float32)
    block = dense_tensors(Checkpoint(out), config, "model.layers.1.", torch.float32)
    assert set(block) == {n for n in whole if n.startswith("model.layers.1.")}
    assert "model.layers.1.mlp.up_proj.weight" in block and not any("weight_packed" in n for n in block)
    assert all(torch.equal(block[n], whole[n]) for n in block)


def test_pruned_model_counts_its_zeros_as_it_streams(tiny, tmp_path):
    folder, data = _llama(tiny, False), tiny[2]
    out = tmp_path / "m50"
    llmpress.compress(folder, "magnitude-50", out=out)
    whole = evaluate(str(out), data, stream=False, **WINDOWS)
    streamed = evaluate(str(out), data, stream=True, **WINDOWS)
    _same_reports(whole, streamed)
    assert streamed["params"]["nonzero"] < streamed["params"]["total"]


def test_quantized_kv_cache_streams_exactly(tiny):
    folder, data = _llama(tiny, True), tiny[2]
    whole = evaluate(folder, data, stream=False, kv_cache=4, **WINDOWS)
    streamed = evaluate(folder, data, stream=True, kv_cache=4, **WINDOWS)
    _same_reports(whole, streamed)
    assert whole["perplexity"] != evaluate(folder, data, stream=False, **WINDOWS)["perplexity"]  # the cache acted


def test_auto_streams_only_what_would_not_fit(tiny, monkeypatch):
    folder, data = _llama(tiny, True), tiny[2]
    assert "streamed" not in evaluate(folder, data, **WINDOWS)
    need = streamed_module.dense_bytes(open_folder(folder).model)
    monkeypatch.setattr(streamed_module, "available_memory", lambda: 2 * need - 1)
    assert evaluate(folder, data, **WINDOWS)["streamed"] is True
    monkeypatch.setattr(streamed_module, "available_memory", lambda: 2 * need)
    assert "streamed" not in evaluate(folder, data, **WINDOWS)


def test_speed_is_skipped_with_a_note(tiny):
    folder, data = _llama(tiny, True), tiny[2]
    report = evaluate(folder, data, stream="on", seq_len=32, max_windows=2)
    assert "speed" not in report and any("speed not measured" in n for n in report["notes"])


def test_stream_on_refuses_what_it_cannot_read(tiny):
    _, tok, data = tiny
    with pytest.raises(LlmpressError, match="--stream off"):
        evaluate("org/not-a-folder", data, stream=True, **WINDOWS)
    with pytest.raises(LlmpressError, match="--stream off"):
        evaluate(tiny_model("llama", vocab_size=len(tok)), data, tokenizer=tok, stream=True, **WINDOWS)
    with pytest.raises(LlmpressError, match="unknown stream setting"):
        evaluate(_llama(tiny, True), data, stream="sometimes", **WINDOWS)


def test_tasks_are_refused_when_streaming(tiny):
    pytest.importorskip("lm_eval")
    with pytest.raises(LlmpressError, match="drop --tasks"):
        evaluate(_llama(tiny, True), tiny[2], stream=True, tasks=["llmpress_lastword"], task_data=tiny[2],
                 **WINDOWS)


def test_cli_eval_stream(tiny, tmp_path, capsys):
    folder, data = _llama(tiny, False), tiny[2]
    out = tmp_path / "r.json"
    args = ["eval", folder, "--data", data, "--seq-len", "32", "--max-windows", "2", "--quiet"]
    assert main([*args, "--stream", "on", "--no-speed", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["streamed"] is True
    assert report["perplexity"] == evaluate(folder, data, seq_len=32, max_windows=2, measure_speed=False,
                                            stream="off")["perplexity"]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "missing"), "--stream", "on", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmpress: error:") and "--stream off" in err and len(err.strip().splitlines()) == 1

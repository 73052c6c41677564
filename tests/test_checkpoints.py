"""The distillation checkpoint: safetensors + JSON, never a pickle; damaged or mismatched ones fail in one line.

Checks: a crafted pickle ``last.pt`` (its ``__reduce__`` writes a marker file) is never unpickled,
through ``train`` and through ``llmpress.compress`` with a ``distill(...)`` recipe, and resuming
from it fails with one line saying why; resuming never calls ``torch.load``; a truncated, foreign,
re-versioned or mismatched checkpoint gives a one-line LlmpressError naming the problem and the fix;
a finished run deletes its checkpoint unless ``keep_checkpoint``, and periodic saves keep one file.
"""

import copy
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmpress
from llmpress.distill.checkpoint import CHECKPOINT, META_KEY
from llmpress.distill.losses import LossConfig
from llmpress.distill.stage import DistillConfig
from llmpress.distill.trainable import prepare_student
from llmpress.distill.trainer import TrainConfig, train
from llmpress.engine import compress_blocks
from llmpress.errors import LlmpressError
from llmpress.models.archs import arch_for
from llmpress.recipe import load_recipe
from tiny_models import random_ids, tiny_model

FAST = {"dtype": "float32", "log_every": 1, "warmup": 0}
W4 = [{"method": "rtn", "args": {"bits": 4, "group_size": 32, "sym": False}}]


class _Payload:
    """Unpickling this writes ``path``: the attack a pickle checkpoint allows."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return _touch, (self.path,)


def _touch(path):  # module-level so pickle can name it; what a crafted file would call (os.system, ...)
    with open(path, "w") as f:
        f.write("pwned")
    return {}


def _crafted(folder, marker):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "last.pt").write_bytes(pickle.dumps(_Payload(marker)))
    pickle.loads((folder / "last.pt").read_bytes())  # the file does what it says when unpickled ...
    assert os.path.exists(marker)
    os.remove(marker)  # ... (checked here once, then removed)


def _student(seed=0):
    teacher = tiny_model("llama", seed=seed)
    model = copy.deepcopy(teacher)
    results = {}
    layers = compress_blocks(model, arch_for(model), list(load_recipe({"stages": W4}).stages), None, results=results)
    return teacher, prepare_student(model, arch_for(model), layers, results, "all")


def _run(folder, rows=6, cfg=None, **kw):
    teacher, student = _student()
    cfg = cfg or TrainConfig(steps=4, lr=3e-3, batch_size=2, checkpoint_every=1, **FAST)
    history = train(student, teacher, random_ids(rows, 16, seed=3), LossConfig("forward_kl"), cfg,
                    checkpoint_dir=folder, **kw)
    return student, history


def _one_line(info, *needles):
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_a_crafted_pickle_is_never_loaded_and_resume_says_why(tmp_path):
    marker = tmp_path / "marker"
    _crafted(tmp_path / "ck", marker)
    with pytest.raises(LlmpressError) as info:
        _run(tmp_path / "ck", resume=True)
    _one_line(info, "last.pt", "pickle", "delete it")
    assert not marker.exists()
    _run(tmp_path / "ck")  # without resume the old file is not read either, and the run succeeds
    assert not marker.exists() and (tmp_path / "ck" / "last.pt").exists()  # the user's file is left alone


def test_a_crafted_pickle_through_compress_with_a_distill_recipe(calib, tmp_path):
    tok, spec = calib
    marker = tmp_path / "marker"
    _crafted(tmp_path / "ck", marker)
    recipe = (f"rtn-w4-g64+distill(steps=2, samples=4, seq_len=16, batch_size=2, data='{spec}', "
              f"checkpoint_dir='{tmp_path / 'ck'}', resume=true, dtype=float32)")
    with pytest.raises(LlmpressError) as info:
        llmpress.compress(tiny_model("llama", vocab_size=len(tok)), recipe, tokenizer=tok, out=tmp_path / "out")
    _one_line(info, "pickle")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_resume_reads_no_pickle(tmp_path, monkeypatch):
    whole, _ = _run(None)
    _run(tmp_path / "ck", stop_at=2)
    header = json.loads(_metadata(tmp_path / "ck" / CHECKPOINT)[META_KEY])
    assert header["state"]["step"] == 2 and header["data"] == {"rows": 6, "columns": 16}
    assert set(load_file(tmp_path / "ck" / CHECKPOINT)) >= {"rng.cpu"}

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    resumed, history = _run(tmp_path / "ck", resume=True)
    assert history["steps"] == 4
    assert all(torch.equal(a, b) for a, b in zip(whole.params, resumed.params))


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "foreign":  # a valid safetensors file that is not a checkpoint
        save_file({"x": torch.zeros(2)}, str(path))
    elif how == "header":
        tensors, meta = load_file(path), _metadata(path)
        save_file(tensors, str(path), metadata={**meta, META_KEY: "{not json"})
    elif how == "version":
        tensors, meta = load_file(path), _metadata(path)
        save_file(tensors, str(path), metadata={**meta, META_KEY: json.dumps({**json.loads(meta[META_KEY]),
                                                                             "version": 99})})
    elif how == "missing":  # a parameter's tensor removed
        tensors, meta = load_file(path), _metadata(path)
        first = next(k for k in tensors if k.startswith("param."))
        save_file({k: v for k, v in tensors.items() if k != first}, str(path), metadata=meta)
    elif how == "optimizer":  # an Adam moment removed
        tensors, meta = load_file(path), _metadata(path)
        first = next(k for k in tensors if k.endswith(".exp_avg"))
        save_file({k: v for k, v in tensors.items() if k != first}, str(path), metadata=meta)


@pytest.mark.parametrize("how, needle", [
    ("truncated", "is damaged or not a safetensors file"),
    ("empty", "is damaged or not a safetensors file"),
    ("foreign", "is not an llmpress distillation checkpoint"),
    ("header", "damaged header"),
    ("version", "format version 99"),
    ("missing", "trains other parameters"),
    ("optimizer", "incomplete or inconsistent"),
])
def test_a_damaged_checkpoint_fails_in_one_line(tmp_path, how, needle):
    _run(tmp_path / "ck", stop_at=2)
    _damage(tmp_path / "ck" / CHECKPOINT, how)
    with pytest.raises(LlmpressError) as info:
        _run(tmp_path / "ck", resume=True)
    _one_line(info, needle, str(tmp_path / "ck" / CHECKPOINT))


def test_a_checkpoint_of_another_run_fails_in_one_line(tmp_path):
    _run(tmp_path / "ck", stop_at=2)
    with pytest.raises(LlmpressError) as info:
        _run(tmp_path / "ck", rows=8, resume=True)
    _one_line(info, "other training data", "new checkpoint folder")
    with pytest.raises(LlmpressError) as info:
        _run(tmp_path / "ck", cfg=TrainConfig(steps=4, lr=3e-3, batch_size=4, checkpoint_every=1, **FAST), resume=True)
    _one_line(info, "different batch_size")
    teacher = tiny_model("llama")
    other = prepare_student(copy.deepcopy(teacher), arch_for(teacher), {}, {}, "norms")
    with pytest.raises(LlmpressError) as info:
        train(other, teacher, random_ids(6, 16, seed=3), LossConfig("forward_kl"),
              TrainConfig(steps=4, lr=3e-3, batch_size=2, checkpoint_every=1, **FAST),
              checkpoint_dir=tmp_path / "ck", resume=True)
    _one_line(info, "trains other parameters")


def test_finished_runs_delete_their_checkpoint_unless_kept(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / f".{CHECKPOINT}.tmp-1").write_bytes(b"left by a killed save")
    _run(tmp_path / "ck", stop_at=3)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [CHECKPOINT]  # one file, stale temp removed
    _run(tmp_path / "ck", resume=True)
    assert not (tmp_path / "ck").exists()
    _run(tmp_path / "kept", keep_checkpoint=True)
    assert json.loads(_metadata(tmp_path / "kept" / CHECKPOINT)[META_KEY])["state"]["step"] == 4
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    _run(tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    with pytest.raises(LlmpressError, match="keep_checkpoint='yes' is invalid"):
        DistillConfig(keep_checkpoint="yes")

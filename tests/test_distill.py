"""The distillation loop, black-box data and the distill stage, on tiny random models.

Checks: training lowers the loss against the teacher and keeps 2:4 masks; a resumed run equals an
uninterrupted one bit for bit; seeds decide everything; greedy generation equals a plain
no-cache reference and the JSONL round-trips through ``jsonl:PATH:text``; the stage runs end to
end inside ``llmpress.compress`` and a QAT model reloads from compressed-tensors on its grid.
"""

import copy
import dataclasses
import itertools
import json

import pytest
import torch
from torch import nn

import llmpress
from llmpress.api import _teacher
from llmpress.data import calibration_samples, load_text
from llmpress.distill.blackbox import GenerateConfig, dataset_spec, generate_dataset, sample_continuations
from llmpress.distill.losses import LossConfig
from llmpress.distill.stage import DistillConfig
from llmpress.distill.trainable import prepare_student
from llmpress.distill.trainer import TrainConfig, batch_indices, learning_rate, train
from llmpress.engine import compress_blocks
from llmpress.errors import LlmpressError
from llmpress.models.archs import arch_for
from llmpress.primitives import dequantize, quantize
from llmpress.recipe import load_recipe
from tiny_models import random_ids, tiny_model

FAST = {"dtype": "float32", "log_every": 1, "warmup": 0}


def compressed(stages, seed=0, **config):
    """(teacher, compressed copy, layers, results) of a tiny llama."""
    teacher = tiny_model("llama", seed=seed, **config)
    model = copy.deepcopy(teacher)
    results = {}
    layers = compress_blocks(model, arch_for(model), list(load_recipe({"stages": stages}).stages), None,
                             results=results)
    return teacher, model, layers, results


def kl_to_teacher(student, teacher, ids):
    """Mean over positions 0..T-2 of KL(p_T || p_S), written out with softmax sums."""
    with torch.no_grad():
        s = student(input_ids=ids, use_cache=False).logits[:, :-1].double()
        t = teacher(input_ids=ids, use_cache=False).logits[:, :-1].double()
    p_t = t.softmax(-1)
    return float((p_t * (p_t.log() - s.log_softmax(-1))).sum(-1).mean())


def two_of_four(W):
    """Whether every group of 4 consecutive inputs has at most 2 nonzeros."""
    return bool(((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


M24 = [{"method": "magnitude", "args": {"sparsity": 0.5, "pattern": "2:4"}}]
W4 = [{"method": "rtn", "args": {"bits": 4, "group_size": 32, "sym": False}}]


@pytest.mark.parametrize("trainable", ["all", "lora", "norms"])
def test_training_lowers_kl_and_keeps_the_2_4_pattern(trainable):
    teacher, model, layers, results = compressed(M24)
    zeros = {n: model.get_submodule(n).weight == 0 for n in layers}
    ids = random_ids(8, 24, seed=1)
    before = kl_to_teacher(model, teacher, ids)
    student = prepare_student(model, arch_for(model), layers, results, trainable)
    lr = 1e-3 if trainable == "all" else 1e-2
    calls, after_step = [], student.after_step
    student.after_step = lambda: (calls.append(1), after_step())
    history = train(student, teacher, ids, LossConfig("forward_kl"),
                    TrainConfig(steps=8, lr=lr, batch_size=4, **FAST))
    assert len(calls) == 8
    if trainable == "all":  # masks re-applied after every step, not only at the end
        assert all(bool((model.get_submodule(n).weight[z] == 0).all()) for n, z in zeros.items())
    student.finalize(results)
    after = kl_to_teacher(model, teacher, ids)
    assert after < (0.97 if trainable == "norms" else 0.9) * before, (before, after)
    assert history["steps"] == 8 and history["tokens"] == 8 * 4 * 24
    assert set(history["log"][-1]) >= {"step", "loss", "lr", "forward_kl"}
    for name, was_zero in zeros.items():
        W = model.get_submodule(name).weight
        assert type(model.get_submodule(name)) is nn.Linear
        assert bool((W[was_zero] == 0).all()) and two_of_four(W), name


def test_grad_accumulation_equals_one_big_batch():
    """2 micro-batches of 2 with accumulation give the gradient of one batch of 4 (same rows, same order)."""
    runs = []
    for batch_size, accum in ((4, 1), (2, 2)):
        teacher, model, layers, results = compressed(M24)
        student = prepare_student(model, arch_for(model), layers, results, "all")
        train(student, teacher, random_ids(8, 16, seed=2), LossConfig("forward_kl"),
              TrainConfig(steps=2, lr=1e-3, batch_size=batch_size, grad_accum=accum, max_grad_norm=0.0, **FAST))
        runs.append([p.detach().clone() for p in student.params])
    assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(*runs))  # Adam divides by |g|
    # the rows of micro-batches 0 and 1 of size 2 are those of batch 0 of size 4
    assert torch.equal(torch.cat([batch_indices(0, 8, 2, 0), batch_indices(1, 8, 2, 0)]), batch_indices(0, 8, 4, 0))


def _qat_run(tmp_path, **kw):
    teacher, model, layers, results = compressed(W4)
    student = prepare_student(model, arch_for(model), layers, results, "all")
    cfg = TrainConfig(steps=4, lr=3e-3, batch_size=2, grad_accum=2, seed=kw.pop("seed", 0), checkpoint_every=1,
                      **FAST)
    history = train(student, teacher, random_ids(6, 16, seed=3), LossConfig("jsd", hidden_weight=0.5, ce_weight=0.1),
                    cfg, **kw)
    return student, history


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    whole, history = _qat_run(tmp_path)
    part, first = _qat_run(tmp_path, checkpoint_dir=tmp_path / "ck", stop_at=2)
    assert first["steps"] == 2 and first["stopped"] == "stop_at"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["last.safetensors"]  # only the last one
    with pytest.raises(LlmpressError, match="different lr"):
        teacher, model, layers, results = compressed(W4)
        student = prepare_student(model, arch_for(model), layers, results, "all")
        train(student, teacher, random_ids(6, 16, seed=3), LossConfig("jsd", hidden_weight=0.5, ce_weight=0.1),
              TrainConfig(steps=4, lr=1e-3, batch_size=2, grad_accum=2, **FAST),
              checkpoint_dir=tmp_path / "ck", resume=True)
    resumed, rest = _qat_run(tmp_path, checkpoint_dir=tmp_path / "ck", resume=True)
    assert rest["steps"] == 4 and rest["tokens"] == history["tokens"]
    assert [e["loss"] for e in rest["log"]] == [e["loss"] for e in history["log"]]
    for a, b in zip(whole.params, resumed.params):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, c) for a, c in zip(whole.params, part.params))
    assert not (tmp_path / "ck").exists()  # a finished run deletes its checkpoint (and the folder it made)
    other, _ = _qat_run(tmp_path, seed=1)  # the seed decides the data order
    assert not all(torch.equal(a, b) for a, b in zip(whole.params, other.params))


def test_qat_lr_scale_multiplies_only_the_qat_weights_step():
    """Adam's first step moves every weight by about lr·sign(g); the QAT latent weights move k times that."""
    moved = {}
    for k in (1.0, 10.0):
        teacher, model, layers, results = compressed(W4)
        student = prepare_student(model, arch_for(model), layers, results, "all")
        before = [p.detach().clone() for p in student.params]
        train(student, teacher, random_ids(4, 16, seed=3), LossConfig("forward_kl"),
              TrainConfig(steps=1, lr=1e-4, batch_size=4, max_grad_norm=0, qat_lr_scale=k, **FAST))
        qat = {id(m.weight) for m in student.qat.values()}
        assert qat and len(qat) < len(student.params)  # norms train too
        moved[k] = [((p.detach() - b).abs().max().item(), id(p) in qat) for p, b in zip(student.params, before)]
    for (one, is_qat), (ten, _) in zip(moved[1.0], moved[10.0]):
        assert one > 0
        assert ten == pytest.approx(10 * one if is_qat else one, rel=1e-3)


def test_data_order_schedule_time_budget_and_progress(capfd):
    rows = torch.cat([batch_indices(j, 10, 5, 7) for j in range(4)])
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:].tolist()) == list(range(10))
    assert not torch.equal(rows[:10], rows[10:])
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10)
    lrs = [learning_rate(cfg, s, 100) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)]) and lrs[10] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:])) and lrs[-1] < 1e-3
    teacher, model, layers, results = compressed(M24)
    student = prepare_student(model, arch_for(model), layers, results, "norms")
    capfd.readouterr()
    history = train(student, teacher, random_ids(4, 8), LossConfig(), TrainConfig(steps=50, max_seconds=1e-4))
    assert history["stopped"] == "time" and history["steps"] == 1 and history["loss"] is not None
    assert capfd.readouterr().err == ""
    train(student, teacher, random_ids(4, 8), LossConfig(), TrainConfig(steps=2, **FAST), progress=True)
    assert "tok_s" in capfd.readouterr().err


def greedy_reference(model, prompts, n):
    """Greedy continuation by full forwards (no KV cache), one token at a time."""
    ids = prompts
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def test_blackbox_generation_and_jsonl_round_trip(calib, tmp_path):
    tok, spec = calib
    teacher = tiny_model("llama", vocab_size=len(tok))
    cfg = GenerateConfig(data=spec, prompts=3, prompt_len=5, new_tokens=7, temperature=0.0, batch_size=2)
    prompts = calibration_samples(tok, spec, 3, 5, 0)
    expected = greedy_reference(teacher, prompts, 7)
    assert torch.equal(sample_continuations(teacher, prompts, cfg), expected)
    top1 = dataclasses.replace(cfg, temperature=0.7, top_k=1)
    assert torch.equal(sample_continuations(teacher, prompts, top1, torch.Generator().manual_seed(5)), expected)
    path = generate_dataset(teacher, tok, cfg, tmp_path / "g.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["text"] for r in records] == tok.batch_decode(expected, skip_special_tokens=True)
    assert load_text(dataset_spec(path)) == "\n\n".join(r["text"] for r in records)
    free = GenerateConfig(data=None, prompts=4, new_tokens=6, top_k=0, seed=3, greedy_first=2)
    a, b = (generate_dataset(teacher, tok, free, tmp_path / f"{k}.jsonl").read_text() for k in "ab")
    c = generate_dataset(teacher, tok, dataclasses.replace(free, seed=4), tmp_path / "c.jsonl")
    assert a == b != c.read_text() and len(a.splitlines()) == 4


def test_stage_qat_end_to_end_and_reload_on_the_grid(calib, tmp_path):
    tok, spec = calib
    teacher = tiny_model("llama", vocab_size=len(tok))
    plain = llmpress.compress(copy.deepcopy(teacher), {"stages": W4}, tokenizer=tok)
    stage = {"method": "distill", "args": {"steps": 4, "lr": 1e-2, "samples": 8, "seq_len": 32, "data": spec,
                                           "loss": "reverse_kl", "batch_size": 2, **FAST}}
    result = llmpress.compress(copy.deepcopy(teacher), {"stages": [*W4, stage]}, tokenizer=tok, out=tmp_path / "q")
    loaded = llmpress.load_model(tmp_path / "q")
    changed = 0
    for name, meta in result.layers.items():
        assert meta["distilled"] == "qat" and meta["distill_steps"] == 4 and meta["bits"] == 4
        before, after = plain.results[name], result.results[name]
        assert torch.equal(before.scale, after.scale) and torch.equal(before.zero, after.zero)
        W = loaded.model.get_submodule(name).weight.float()
        assert torch.equal(W, result.model.get_submodule(name).weight)
        assert torch.equal(W, dequantize(quantize(W, before.scale, before.zero, 4, 32), before.scale, before.zero, 32))
        assert torch.equal(quantize(W, before.scale, before.zero, 4, 32), after.qweight)
        changed += int((after.qweight != before.qweight).sum())
    assert changed > 0


def test_stage_lora_blackbox_and_recipes(calib, tmp_path):
    tok, spec = calib
    teacher = tiny_model("llama", vocab_size=len(tok))
    gen = tmp_path / "gen.jsonl"
    stage = {"method": "distill", "args": {"train": "lora", "loss": "ce", "source": "generated", "data": spec,
                                           "prompts": 4, "prompt_len": 4, "new_tokens": 24, "generated_path": str(gen),
                                           "steps": 2, "samples": 4, "seq_len": 16, **FAST}}
    result = llmpress.compress(copy.deepcopy(teacher), {"stages": [*M24, stage]}, tokenizer=tok)
    assert len(gen.read_text().splitlines()) == 4
    for name, meta in result.layers.items():
        assert meta["distilled"] == "lora" and two_of_four(result.model.get_submodule(name).weight)
    r = load_recipe("gptq-w3-g64+distill-lora")
    assert [s.method for s in r.stages] == ["gptq", "distill"] and r.calibration.dtype == "auto"
    assert r.stages[1].config.train == "lora" and r.name == "gptq-w3-g64+distill-lora"
    assert [s.method for s in load_recipe("awq+gptq-w4-g64+distill").stages] == ["awq", "gptq", "distill"]
    with pytest.raises(LlmpressError, match="unknown recipe 'rtn-w4-g64\\+nope'"):
        load_recipe("rtn-w4-g64+nope")
    assert _teacher(teacher, load_recipe("rtn-w4-g64")) is None
    copied = _teacher(teacher, load_recipe("sparsegpt-24+distill"))
    assert copied is not teacher and not any(p.requires_grad for p in copied.parameters())


@pytest.mark.parametrize("args, needle", [
    ({"train": "some"}, "train='some' is invalid"),
    ({"loss": "kld"}, "unknown distillation loss 'kld'"),
    ({"steps": 0}, "steps=0 is invalid"),
    ({"qat_lr_scale": 0}, "qat_lr_scale=0 freezes"),
    ({"qat_lr_scale": -1}, "qat_lr_scale=-1 is invalid"),
    ({"source": "web"}, "source='web' is invalid"),
    ({"resume": True}, "resume needs checkpoint_dir"),
    ({"data": "austen:nope"}, "unknown Austen text"),
    ({"source": "generated", "top_p": 0}, "top_p=0 is invalid"),
    ({"kv_bits": 3}, "kv_bits=3 is not supported"),
])
def test_bad_distill_configs_name_the_problem(args, needle):
    with pytest.raises(LlmpressError) as info:
        DistillConfig(**args)
    assert needle in str(info.value) and "\n" not in str(info.value)

"""Resume points of model-level stages (``llmpress.resume``): depth pruning's block scores and greedy rounds,
low-rank's statistics, curves and factors are kept as they are computed; a run killed (SIGKILL) and started again
with the same command reads them instead of computing them again and writes the same bytes; another command is
refused in one line; a finished run leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from llmpress.models.archs import arch_for
from llmpress.prune import depth
from llmpress.prune.depth import DepthConfig, depth_prune
from llmpress.resume import NO_RESUME, Resume
from tiny_models import tiny_model

KILLER = textwrap.dedent("""
    import importlib, os, signal, sys
    from llmpress import cli, resume
    key, nth = os.environ.get("KILL_KEY", ""), int(os.environ.get("KILL_NTH", "1"))
    seen = []
    for kind in ("put_json", "put_tensors"):
        original = getattr(resume.Resume, kind)
        def killing(self, name, value, _original=original):
            _original(self, name, value)
            if key and (self.scope + name).startswith(key):
                seen.append(name)
                if len(seen) == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
        setattr(resume.Resume, kind, killing)
    call = os.environ.get("KILL_CALL", "")
    if call:  # SIGKILL after the nth call of module:function returned
        module, attr = call.split(":")
        owner = importlib.import_module(module)
        function, calls = getattr(owner, attr), []
        def killing_call(*args, **kwargs):
            out = function(*args, **kwargs)
            calls.append(1)
            if len(calls) == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        setattr(owner, attr, killing_call)
    for target in filter(None, os.environ.get("FORBID", "").split(",")):
        module, attr = target.split(":")
        def forbidden(*args, _name=target, **kwargs):
            raise RuntimeError(f"{_name} ran again on a resumed run")
        setattr(importlib.import_module(module), attr, forbidden)
    sys.exit(cli.main(sys.argv[1:]))
""")


def _run(args, kill_key: str = "", nth: int = 1, forbid: str = "", kill_call: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_KEY": kill_key, "KILL_NTH": str(nth), "FORBID": forbid, "KILL_CALL": kill_call}
    return subprocess.run([sys.executable, "-c", KILLER, *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, calib):
    tok, data = calib
    root = tmp_path_factory.mktemp("resume")
    model = tiny_model("llama", num_hidden_layers=4, vocab_size=len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model", data


def _same_folders(a, b) -> None:
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        if name.endswith(".safetensors") or name == "config.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("recipe, kill_key, nth, forbid", [
    # block influence kept, then the kill: the resumed run must not measure it again
    ("depth(blocks=1)", "0-depth/influence", 1, "llmpress.prune.depth:block_influences"),
    # statistics, every curve and two factorisations kept: the resumed run collects and curves nothing again
    ("svd-llm-80", "0-svd-llm/factors.", 2,
     "llmpress.lowrank.stage:collect_input_stats,llmpress.lowrank.stage:_curve"),
])
def test_sigkill_then_same_command_resumes_byte_identical(folder, tmp_path, recipe, kill_key, nth, forbid):
    model, data = folder
    args = ["compress", str(model), "--recipe", recipe, "--data", data, "--samples", "4", "--seq-len", "32",
            "--quiet"]
    full = _run([*args, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    assert not (tmp_path / ".full.stages").exists()  # a finished run leaves nothing behind
    out = tmp_path / "again"
    killed = _run([*args, "--out", str(out)], kill_key=kill_key, nth=nth)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    stages = tmp_path / ".again.stages"
    assert not out.exists() and stages.is_dir()
    other = _run(["compress", str(model), "--recipe", "depth(blocks=2)", "--data", data, "--samples", "4",
                  "--seq-len", "32", "--out", str(out), "--quiet"])
    assert other.returncode == 2 and "unfinished run of another command" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    again = _run([*args, "--out", str(out)], forbid=forbid)
    assert again.returncode == 0, again.stderr
    assert not stages.exists()
    _same_folders(tmp_path / "full", out)


def test_distillation_killed_after_a_checkpoint_resumes_from_it(folder, tmp_path):
    """Without a checkpoint_dir of its own, the distill stage checkpoints in the run's resume folder (every tenth
    of its steps): killed after its second checkpoint, the same command continues from it to the same bytes."""
    model, data = folder
    recipe = f"rtn-w4-g64+distill(steps=10, samples=8, seq_len=16, batch_size=2, data='{data}')"
    args = ["compress", str(model), "--recipe", recipe, "--quiet"]
    full = _run([*args, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    out = tmp_path / "again"
    killed = _run([*args, "--out", str(out)], kill_call="llmpress.distill.trainer:save_checkpoint", nth=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / ".again.stages" / "1-distill" / "last.safetensors").is_file()
    # one checkpoint per step: a run from the start would save 10 times, and be killed at the 9th; resumed after
    # step 2 it saves 8 times
    again = _run([*args, "--out", str(out)], kill_call="llmpress.distill.trainer:save_checkpoint", nth=9)
    assert again.returncode == 0, again.stderr
    assert not (tmp_path / ".again.stages").exists()
    _same_folders(tmp_path / "full", out)


def test_greedy_depth_search_continues_after_its_last_kept_round(calib, tmp_path, monkeypatch):
    tok, data = calib
    from llmpress.data.windows import calibration_samples

    samples = calibration_samples(tok, data, 4, 32, 0)
    cfg = DepthConfig(blocks=2, metric="ppl")
    trials = []
    real = depth._loss_without

    def counting(model, blocks, skipped, *args):
        trials.append(list(skipped))
        return real(model, blocks, skipped, *args)

    monkeypatch.setattr(depth, "_loss_without", counting)
    model = tiny_model("llama", num_hidden_layers=4, vocab_size=len(tok))
    kept = Resume(tmp_path / "r")
    whole = depth_prune(model, arch_for(model), samples, cfg, resume=kept)
    assert len(trials) == 4 + 3  # two rounds over the remaining blocks
    first = kept.json("greedy")
    assert len(first) == 2
    kept.put_json("greedy", first[:1])  # as a run killed after its first round left it
    trials.clear()
    model = tiny_model("llama", num_hidden_layers=4, vocab_size=len(tok))
    resumed = depth_prune(model, arch_for(model), samples, cfg, resume=kept)
    assert len(trials) == 3 and all(t[0] == first[0] for t in trials)  # only the second round ran
    assert resumed == whole


def test_resume_entries_round_trip_and_none_keeps_nothing(tmp_path):
    r = Resume(tmp_path).scoped("0-x")
    shared = torch.randn(3, 3)
    r.put_tensors("t", {"a": shared, "b": shared, "c": torch.arange(4)})
    r.put_json("j", {"k": [1.5, 2]})
    got = r.tensors("t")
    assert torch.equal(got["a"], shared) and torch.equal(got["b"], shared) and torch.equal(got["c"], torch.arange(4))
    assert r.json("j") == {"k": [1.5, 2]} and r.json("missing") is None and r.tensors("missing") is None
    assert sorted(p.name for p in (tmp_path / "0-x").iterdir()) == ["j.json", "t.safetensors"]  # no temporaries
    nothing = NO_RESUME.scoped("0-x")
    nothing.put_json("j", 1)
    assert nothing.json("j") is None and nothing.tensors("t") is None

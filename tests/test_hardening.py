"""Issue 19: every foreseeable failure is one ``llmpress: error:`` line, exit 2 (130 for Ctrl-C), no traceback,
nothing left beside the output; checks run before any work; saved files are ordinary; a killed save is cleaned up."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmpress import save as save_module
from llmpress.cli import main
from llmpress.errors import LlmpressError
from llmpress.recipe import load_recipe
from tiny_models import tiny_gguf, tiny_model, tiny_tokenizer

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny llama folder without a tokenizer."""
    path = tmp_path_factory.mktemp("hard") / "llama"
    tiny_model("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tiny llama folder with a tokenizer, so text can be evaluated."""
    path = tmp_path_factory.mktemp("hardtok") / "llama"
    tok = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(code: int, err: str, needle: str, expected: int = 2) -> str:
    """Exit ``expected``, exactly one error line containing ``needle``, no traceback; returns the line."""
    lines = [line for line in err.splitlines() if line.startswith("llmpress: error:")]
    assert code == expected, err
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def error_case(capsys, folder: Path, argv, needle: str, expected: int = 2) -> str:
    """Run ``argv``; one error line and nothing new in ``folder`` (the output's parent)."""
    before = sorted(p.name for p in folder.iterdir())
    code, _out, err = run(capsys, *argv)
    line = one_error(code, err, needle, expected)
    assert sorted(p.name for p in folder.iterdir()) == before, "something was written"
    return line


# ---------------------------------------------------------------- damaged model files


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:5000])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[20] = ord("#")  # inside the JSON header
    path.write_bytes(bytes(data))


def _huge_header_length(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2**60)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _empty, _corrupt_header, _huge_header_length])
@pytest.mark.parametrize("command", ["compress", "eval"])
def test_damaged_safetensors(capsys, tmp_path, tiny_dir, damage, command):
    model = copy_model(tiny_dir, tmp_path / "model")
    damage(model / "model.safetensors")
    argv = [command, model] + (["--recipe", "rtn-w4-g64", "--out", tmp_path / "out"] if command == "compress" else [])
    error_case(capsys, tmp_path, argv, "cannot load the weights in")


def test_renamed_weight_is_refused_not_random(capsys, tmp_path, tiny_dir):
    model = copy_model(tiny_dir, tmp_path / "model")
    data = bytearray((model / "model.safetensors").read_bytes())
    i = data.find(b"down_proj")
    data[i] = ord("x")
    (model / "model.safetensors").write_bytes(bytes(data))
    error_case(capsys, tmp_path, ["compress", model, "--recipe", "rtn-w4-g64", "--out", tmp_path / "out"],
               "lacks 1 weight(s) config.json needs (first: model.layers.0.mlp.down_proj.weight)")


def test_shape_mismatch(capsys, tmp_path, tiny_dir):
    model = copy_model(tiny_dir, tmp_path / "model")
    data = bytearray((model / "model.safetensors").read_bytes())
    i = data.find(b"[256,64]")
    data[i:i + 8] = b"[64,256]"
    (model / "model.safetensors").write_bytes(bytes(data))
    error_case(capsys, tmp_path, ["eval", model], "weights with other shapes than config.json's")


@pytest.mark.parametrize("content, needle", [
    ('{"layers": ', "llmpress.json is damaged (Expecting value"),
    ("[1, 2]", "llmpress.json is damaged (the whole file has the wrong JSON type)"),
    ('{"layers": [1]}', "llmpress.json is damaged (layers has the wrong JSON type)"),
    (b"\xff\xfe{}", "llmpress.json is damaged"),
])
def test_damaged_llmpress_json(capsys, tmp_path, tiny_dir, content, needle):
    model = copy_model(tiny_dir, tmp_path / "model")
    meta = model / "llmpress.json"
    meta.write_bytes(content if isinstance(content, bytes) else content.encode())
    error_case(capsys, tmp_path, ["eval", model], needle)


@pytest.mark.parametrize("cut", [6, 10, 24, 40, 100, 150, 200])
def test_gguf_with_cut_header(capsys, tmp_path, cut):
    full = tiny_gguf(tmp_path / "full.gguf").read_bytes()
    (tmp_path / "full.gguf").unlink()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(full[:cut])
    assert full[:4] == b"GGUF"
    error_case(capsys, tmp_path, ["eval", bad], "GGUF file")


def test_gguf_header_that_disagrees_with_its_tensors(capsys, tmp_path):
    bad = tiny_gguf(tmp_path / "m.gguf")  # block_count 1, but no blk.0 tensors
    error_case(capsys, tmp_path, ["compress", bad, "--recipe", "rtn-w4-g64", "--out", tmp_path / "o"],
               "is inconsistent (llama.block_count is 1 but the file has tensors for 0 blocks)")


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickle_bin_is_refused_without_running_code(capsys, tmp_path, tiny_dir):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((tiny_dir / "config.json").read_text())
    marker = tmp_path / "MARKER"
    with open(model / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Marker(str(marker))}, f)
    error_case(capsys, tmp_path, ["eval", model], "a pickle that torch refuses to load safely")
    assert not marker.exists()


# ---------------------------------------------------------------- recipes


def test_recipe_not_utf8(capsys, tmp_path, tiny_dir):
    bad = tmp_path / "r.yaml"
    bad.write_bytes(b"stages: [{method: rtn}]\n# caf\xe9\n")
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", bad, "--out", tmp_path / "o"],
               "is not UTF-8 text")


@pytest.mark.parametrize("text", [
    "[" * 5000 + "]" * 5000,
    "stages:\n" + "".join(" " * (2 * i + 2) + "- \n" for i in range(200)),
    "{a: " * 3000 + "1" + "}" * 3000,
])
def test_recipe_nested_too_deep(capsys, tmp_path, tiny_dir, text):
    bad = tmp_path / "deep.yaml"
    bad.write_text(text)
    start = time.perf_counter()
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", bad, "--out", tmp_path / "o"],
               "nests more than 50 levels deep")
    assert time.perf_counter() - start < 10


def test_recipe_too_big_is_refused_at_once(capsys, tmp_path, tiny_dir):
    big = tmp_path / "big.yaml"
    big.write_text("stages: [{method: rtn}]\n" + "# padding\n" * 1_000_000)  # 10 MB
    start = time.perf_counter()
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", big, "--out", tmp_path / "o"],
               "over the 1,000,000-byte limit")
    assert time.perf_counter() - start < 5


def test_recipe_name_nested_too_deep(capsys, tmp_path, tiny_dir):
    name = "rtn(bits=" + "[" * 5000 + "]" * 5000 + ")"
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", name, "--out", tmp_path / "o"],
               "too long or nests too deep")


@pytest.mark.parametrize("recipe, needle", [
    ("rtn(bits=4, sym=maybe)", "rtn sym='maybe' is invalid: use true or false"),
    ("rtn(bits=4, sym=no)", "rtn sym='no' is invalid: use true or false"),
    ("rtn(bits=4, sym=1)", "rtn sym=1 is invalid"),
    ("rtn-w4-g64(mse=yes)", "rtn mse='yes' is invalid"),
    ("gptq(sym=off)", "sym='off' is invalid"),
])
def test_rtn_flags_are_validated(capsys, tmp_path, tiny_dir, recipe, needle):
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", recipe, "--out", tmp_path / "o"], needle)


def test_rtn_flags_from_yaml(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("stages: [{method: rtn, args: {sym: maybe}}]\n")
    with pytest.raises(LlmpressError, match="rtn sym='maybe' is invalid"):
        load_recipe(str(bad))
    assert load_recipe("rtn(bits=4, sym=false)").stages[0].config.sym is False
    assert load_recipe("rtn-w4-g64-asym").stages[0].config.sym is False


# ---------------------------------------------------------------- text sources


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_text_source_not_utf8(capsys, tmp_path, tok_dir, kind):
    bad = tmp_path / f"latin.{kind}"
    bad.write_bytes(b'{"text": "caf\xe9"}\n' if kind == "jsonl" else b"caf\xe9 au lait\n" * 50)
    spec = f"jsonl:{bad}:text" if kind == "jsonl" else f"text:{bad}"
    error_case(capsys, tmp_path, ["eval", tok_dir, "--data", spec, "--seq-len", 8, "--no-speed"],
               "is not UTF-8 text")


def test_hf_without_network_fails_fast_in_one_line(capsys, tmp_path, tok_dir, monkeypatch):
    pytest.importorskip("datasets")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    start = time.perf_counter()
    code, _out, err = run(capsys, "eval", tok_dir, "--data", "hf:no-such/dataset", "--seq-len", 8, "--quiet")
    one_error(code, err, "the Hugging Face hub is out of reach (127.0.0.1:")
    assert time.perf_counter() - start < 15
    assert err.strip().count("\n") == 0, err  # --quiet: the one error line and nothing else
    assert "Retrying" not in err


def test_hub_id_without_network_fails_fast(capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    code, _out, err = run(capsys, "eval", "no-such-org/no-such-model", "--quiet")
    one_error(code, err, "is not in the local hub cache and the Hugging Face hub is out of reach")
    assert time.perf_counter() - start < 15
    assert constants.HF_HUB_OFFLINE is False  # offline mode was for the one call


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("device, needle", [
    ("meta", "device 'meta' cannot run llmpress"),
    ("xla", "device 'xla' cannot run llmpress"),
    ("cuda:99", "device 'cuda:99' is not available here"),
    ("gpu0", "unknown device 'gpu0'"),
])
def test_unusable_device(capsys, tmp_path, tiny_dir, device, needle):
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", tmp_path / "o",
                                  "--device", device], needle)


def test_mps_without_apple_gpu(capsys, tmp_path, tiny_dir):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    error_case(capsys, tmp_path, ["eval", tiny_dir, "--device", "mps"], "device 'mps' is not available here")


# ---------------------------------------------------------------- outputs checked before any work


def test_out_under_proc_fails_at_once(capsys, tmp_path, tiny_dir, monkeypatch):
    calls = []
    monkeypatch.setattr("llmpress.api.load_model", lambda *a, **k: calls.append(a))
    code, _out, err = run(capsys, "compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", "/proc/llmpress-out")
    one_error(code, err, "cannot write output folder /proc/llmpress-out")
    assert calls == []


def test_out_on_read_only_file_system(capsys, tmp_path, tiny_dir, monkeypatch):
    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(save_module.tempfile, "mkstemp", read_only)
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", tmp_path / "o"],
               "cannot write output folder")


def test_out_in_unwritable_folder(capsys, tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setattr(save_module.os, "access", lambda *_a, **_k: False)
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", tmp_path / "o"],
               "is not writable")


@pytest.mark.parametrize("flag", ["--json", "--report"])
def test_eval_outputs_need_an_existing_folder(capsys, tmp_path, tiny_dir, flag):
    error_case(capsys, tmp_path, ["eval", tiny_dir, flag, tmp_path / "missing" / "r"],
               f"cannot write {flag} {tmp_path / 'missing' / 'r'}: folder {tmp_path / 'missing'} does not exist")


def test_out_needs_an_existing_folder(capsys, tmp_path, tiny_dir):
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", tmp_path / "a" / "b"],
               "folder " + str(tmp_path / "a") + " does not exist; create it first")


def test_not_enough_disk_space(capsys, tmp_path, tiny_dir, monkeypatch):
    import shutil as real_shutil

    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(save_module.shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", tmp_path / "o"],
               "not enough disk space")


def test_disk_full_while_saving(capsys, tmp_path, tiny_dir, monkeypatch):
    from transformers import PreTrainedModel

    def full(self, folder, *a, **k):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", tmp_path / "o",
                                  "--format", "dense", "--stream", "off"], "no space left on the device")


def test_disk_full_while_streaming(capsys, tmp_path, tiny_dir, monkeypatch):
    from llmpress import stream

    def full(tensors, path, metadata=None):
        Path(str(path) + ".tmp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(stream, "_atomic_save", full)
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", tmp_path / "o"],
               "no space left on the device")


def test_seq_len_longer_than_the_model(capsys, tmp_path, tok_dir):
    error_case(capsys, tmp_path, ["eval", tok_dir, "--seq-len", 100000],
               "--seq-len 100000 is longer than the model's context of 256 tokens")
    error_case(capsys, tmp_path, ["compress", tok_dir, "--recipe", "wanda-50", "--seq-len", 100000,
                                  "--out", tmp_path / "o"], "calibration seq_len 100000 is longer than")


def test_all_windows_are_announced(capsys, tmp_path, tok_dir, caplog):
    text = tmp_path / "t.txt"
    text.write_text("the a of and to in was she her he it\n" * 40)
    with caplog.at_level(logging.INFO, logger="llmpress"):
        code, _out, err = run(capsys, "eval", tok_dir, "--data", f"text:{text}", "--seq-len", 8,
                              "--max-windows", 0, "--no-speed")
    assert code == 0, err
    assert any("evaluating all" in r.message and "windows of 8 tokens" in r.message for r in caplog.records)


def test_a_long_evaluation_is_warned_about(tmp_path, tok_dir, caplog, monkeypatch):
    from llmpress import api

    monkeypatch.setattr(api, "LONG_EVAL_TOKENS", 100)
    text = tmp_path / "t.txt"
    text.write_text("the a of and to in was she her he it\n" * 40)
    with caplog.at_level(logging.INFO, logger="llmpress"):
        api.evaluate(str(tok_dir), f"text:{text}", seq_len=8, max_windows=None, measure_speed=False)
    assert any(r.levelno == logging.WARNING and "use --max-windows N" in r.message for r in caplog.records)


# ---------------------------------------------------------------- the boundary itself


def test_ctrl_c_is_one_line_and_leaves_nothing(capsys, tmp_path, tiny_dir, monkeypatch):
    from transformers import PreTrainedModel

    def interrupted(self, folder, *a, **k):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", tmp_path / "o",
                                  "--format", "dense", "--stream", "off"], "interrupted (Ctrl-C)", expected=130)


def test_ctrl_c_while_streaming_the_first_block_leaves_nothing(capsys, tmp_path, tiny_dir, monkeypatch):
    from llmpress import stream

    def interrupted(tensors, path, metadata=None):
        Path(str(path) + ".tmp").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(stream, "_atomic_save", interrupted)
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", tmp_path / "o"],
               "interrupted (Ctrl-C)", expected=130)


def test_debug_shows_the_traceback(tmp_path, tiny_dir):
    with pytest.raises(LlmpressError, match="rtn sym='maybe'"):
        main(["--debug", "compress", str(tiny_dir), "--recipe", "rtn(sym=maybe)", "--out", str(tmp_path / "o")])
    with pytest.raises(LlmpressError, match="rtn sym='maybe'"):
        main(["compress", str(tiny_dir), "--recipe", "rtn(sym=maybe)", "--out", str(tmp_path / "o"), "--debug"])


def test_a_bug_is_one_line_exit_1(capsys, tmp_path, tiny_dir, monkeypatch):
    def bug(*_a, **_k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("llmpress.api.compress", bug)
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", tmp_path / "o"],
               "internal error: ZeroDivisionError: division by zero (run with --debug", expected=1)


def _safetensor_error():
    from safetensors import SafetensorError

    return SafetensorError("Error while deserializing header: header too small")


@pytest.mark.parametrize("make, needle", [
    (lambda: OSError(errno.ENOSPC, "No space left on device", "/x/model.safetensors"), "no space left on the device"),
    (lambda: PermissionError(errno.EACCES, "Permission denied", "/x"), "permission denied (/x)"),
    (lambda: RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
    (lambda: MemoryError(), "out of memory"),
    (lambda: RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"), "out of memory"),
    (lambda: UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "is not UTF-8"),
    (lambda: json.JSONDecodeError("Expecting value", "{", 1), "a JSON file is damaged"),
    (lambda: struct.error("unpack requires a buffer of 8 bytes"), "ends early or is corrupt"),
    (lambda: pickle.UnpicklingError("Weights only load failed"), "refused to unpickle"),
    (_safetensor_error, "cannot read a model file (Error while deserializing header"),
])
def test_foreseeable_failures_are_worded(capsys, tmp_path, tiny_dir, monkeypatch, make, needle):
    def fail(*_a, **_k):
        raise make()

    monkeypatch.setattr("llmpress.api.compress", fail)
    error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", tmp_path / "o"], needle)


@pytest.mark.parametrize("argv, needle", [
    (["compress", "m"], "the following arguments are required: --recipe, --out"),
    (["eval", "m", "--max-windows", "x"], "argument --max-windows: invalid int value: 'x'"),
    (["eval", "m", "--kv-bits", "3"], "argument --kv-bits: invalid choice"),
    (["frobnicate"], "argument command: invalid choice"),
    (["eval", "m", "--nope"], "unrecognized arguments: --nope"),
])
def test_usage_errors_are_one_line(capsys, tmp_path, argv, needle):
    code, out, err = run(capsys, *argv)
    one_error(code, err, needle)
    assert err.strip().count("\n") == 0 and out == ""


# ---------------------------------------------------------------- saved files


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_are_ordinary(capsys, tmp_path, tok_dir, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "w4"
        code, _out, err = run(capsys, "compress", tok_dir, "--recipe", "rtn-w4-g64", "--out", out, "--quiet")
        assert code == 0, err
        text = tmp_path / "t.txt"
        text.write_text("the a of and to in was she her he it\n" * 20)
        report = tmp_path / "report"
        code, _out, err = run(capsys, "eval", out, "--data", f"text:{text}", "--seq-len", 8, "--no-speed",
                              "--report", report, "--json", tmp_path / "r.json")
        assert code == 0, err
    finally:
        os.umask(old)
    modes = {**_modes(out), **_modes(report), "r.json": stat.S_IMODE((tmp_path / "r.json").stat().st_mode)}
    assert {"model.safetensors.index.json", "config.json", "llmpress.json", "report.json", "report.md"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_folder_is_reported_and_removed(capsys, tmp_path, tiny_dir, caplog):
    out = tmp_path / "w4"
    stale = tmp_path / f".w4.tmp-{_dead_pid()}-abc_123"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    alive = tmp_path / f".w4.tmp-{os.getppid()}-zzz"  # a running process's: not ours to remove
    alive.mkdir()
    other = tmp_path / ".w4.tmp-notapid"
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="llmpress"):
        code, _out, err = run(capsys, "compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", out, "--quiet")
    assert code == 0, err
    assert not stale.exists() and alive.exists() and other.exists() and out.is_dir()
    lines = [r.message for r in caplog.records if "unfinished temporary folder" in r.message]
    assert len(lines) == 1 and stale.name in lines[0]


_SAVE_AND_WAIT = """
import signal, sys, time
# a shell that starts a job in the background starts it with SIGINT ignored, and Python then installs no
# KeyboardInterrupt handler: put back the one an interactive user has, whoever started the tests
signal.signal(signal.SIGINT, signal.default_int_handler)
from transformers import PreTrainedModel
from llmpress.cli import main
original = PreTrainedModel.save_pretrained
def slow(self, *a, **k):
    original(self, *a, **k)
    print("SAVING", flush=True)
    time.sleep(120)
PreTrainedModel.save_pretrained = slow
sys.exit(main(sys.argv[1:]))
"""


def _start_saving(argv: list[str]) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_AND_WAIT, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert line.strip() == "SAVING", proc.stderr.read()
    return proc


def test_sigkill_while_saving_then_the_same_command(capsys, tmp_path, tiny_dir, caplog):
    out = tmp_path / "w4"
    argv = ["compress", str(tiny_dir), "--recipe", "rtn-w4-g64", "--out", str(out), "--format", "dense", "--quiet",
            "--stream", "off"]  # the in-memory saver; a streamed run's kill and resume: tests/test_stream.py
    proc = _start_saving(argv)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".w4.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file() and not out.exists()
    with caplog.at_level(logging.WARNING, logger="llmpress"):
        code, _out, err = run(capsys, *argv)
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["w4"]
    assert any(leftovers[0].name in r.message for r in caplog.records)


def test_sigint_while_saving_is_one_line_and_leaves_nothing(tmp_path, tiny_dir):
    out = tmp_path / "w4"
    proc = _start_saving(["compress", str(tiny_dir), "--recipe", "rtn-w4-g64", "--out", str(out),
                          "--format", "dense", "--quiet", "--stream", "off"])
    proc.send_signal(signal.SIGINT)
    _stdout, err = proc.communicate(timeout=60)
    one_error(proc.returncode, err, "interrupted (Ctrl-C)", expected=130)
    assert list(tmp_path.iterdir()) == []


def test_json_written_with_ordinary_mode_and_no_temporary(tmp_path):
    from llmpress.cli import _write_json

    target = tmp_path / "x.json"
    _write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]

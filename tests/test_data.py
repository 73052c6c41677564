"""Tests for llmpress.data: specs, loaders, windows, caching and the Austen corpus.

Most tests use a tiny byte-level BPE tokenizer trained on synthetic text and a
temporary cache; the few marked ``real`` use the Debian Austen corpus and the
SmolLM2 GGUF tokenizer.
"""

from __future__ import annotations

import gzip
import json
import lzma
import random
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from llmpress.data import (
    SPEC_HELP,
    austen,
    calibration_samples,
    describe_spec,
    eval_windows,
    load_text,
    token_ids,
    tokenize_text,
)
from llmpress.data import windows as windows_mod
from llmpress.errors import LlmpressError


def _prose(n_lines: int = 600, seed: int = 0) -> str:
    r = random.Random(seed)
    words = "the a of and to in was she her he it for not with that miss had be Anne Elliot captain".split()
    lines = [" ".join(r.choice(words) for _ in range(r.randint(0, 12))).capitalize() for _ in range(n_lines)]
    return "\n".join(lines)


TEXT = _prose()


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=alphabet, special_tokens=["<bos>"], show_progress=False
    )
    tk.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "prose.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _raises(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(LlmpressError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert match in message, message
    assert "\n" not in message
    return message


# --- specs and loaders --------------------------------------------------------


def test_text_and_describe(text_file):
    assert load_text(f"text:{text_file}") == TEXT
    assert describe_spec(f"text:{text_file}") == "text file prose.txt"
    assert describe_spec("austen:eval") == "Austen: Persuasion (held out)"
    assert describe_spec("austen:pride") == "Austen: Pride and Prejudice (single novel)"
    assert describe_spec("jsonl:/x/d.jsonl:body") == "JSON lines d.jsonl, field 'body'"
    wiki = "dataset wikitext, config wikitext-2-raw-v1, split test"
    assert describe_spec("hf:wikitext:wikitext-2-raw-v1:test") == wiki


def test_jsonl_field_extraction(tmp_path):
    path = tmp_path / "d.jsonl"
    records = [{"body": "first doc\nline two", "n": 1}, {"body": "second", "n": 2}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    assert load_text(f"jsonl:{path}:body") == "first doc\nline two\n\nsecond"
    msg = _raises("no string field 'text'", load_text, f"jsonl:{path}:text")
    assert "fields: body, n" in msg and "jsonl:" in msg
    _raises("no string field 'n'", load_text, f"jsonl:{path}:n")  # present but not a string


def test_spec_errors(tmp_path):
    msg = _raises("unknown text source 'wiki'", load_text, "wiki:foo")
    assert SPEC_HELP in msg
    assert SPEC_HELP in _raises("bad text spec", load_text, "persuasion.txt")
    _raises(f"text file not found: {tmp_path}/nope.txt", load_text, f"text:{tmp_path}/nope.txt")
    _raises("not found", load_text, f"jsonl:{tmp_path}/nope.jsonl:text")
    _raises("write jsonl:PATH:FIELD", load_text, "jsonl:nofield")
    msg = _raises("unknown Austen text 'emmma'", describe_spec, "austen:emmma")
    assert all(f"austen:{n}" in msg for n in ["calib", "eval", "eval2", "persuasion", "northanger"])


def test_window_argument_errors(tok, cache, text_file):
    spec = f"text:{text_file}"
    _raises("n must be at least 1, got 0", calibration_samples, tok, spec, 0, 16)
    _raises("seq_len must be at least 1, got 0", calibration_samples, tok, spec, 4, 0)
    _raises("seq_len must be at least 1, got -3", eval_windows, tok, spec, -3)
    _raises("max_windows must be at least 1", eval_windows, tok, spec, 16, max_windows=0)
    _raises("at least 2 when a BOS", eval_windows, tok, spec, 1, add_bos=True)
    n_tokens = len(token_ids(tok, spec))
    msg = _raises(f"has only {n_tokens} tokens", calibration_samples, tok, spec, 4, n_tokens + 1)
    assert "--seq-len" in msg and "fewer samples" in msg
    _raises(f"has only {n_tokens} tokens", eval_windows, tok, spec, n_tokens + 1)


def test_hf_local_folder(tmp_path, monkeypatch, cache):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    rows = [{"body": "alpha beta", "id": 1}, {"body": "gamma", "id": 2}]
    (ds_dir / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (ds_dir / "test.jsonl").write_text(json.dumps({"body": "held out", "id": 3}), encoding="utf-8")
    assert load_text(f"hf:{ds_dir}") == "alpha beta\n\ngamma"  # the single string column
    assert load_text(f"hf:{ds_dir}::test") == "held out"
    _raises("cannot load dataset", load_text, f"hf:{ds_dir}::nosuchsplit")


def test_hf_without_datasets(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    _raises("pip install llmpress[hf]", load_text, f"hf:{tmp_path}")


# --- tokenization, windows, cache ------------------------------------------------


def test_tokenize_in_chunks_matches_whole(tok):
    whole = tok(TEXT, add_special_tokens=False)["input_ids"]
    pieces = windows_mod._chunks(TEXT, 1000)
    assert len(pieces) > 10 and "".join(pieces) == TEXT
    assert all(len(p) <= 1000 for p in pieces)
    assert tokenize_text(tok, TEXT, chunk_chars=1000).tolist() == whole
    assert tokenize_text(tok, TEXT).dtype == torch.long
    assert windows_mod._chunks("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]  # no newline: hard cut


def test_eval_windows_exact(tok, cache, text_file):
    spec = f"text:{text_file}"
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    seq = 100
    w = eval_windows(tok, spec, seq)
    assert w.shape == (len(ids) // seq, seq) and w.dtype == torch.long
    for i in range(w.shape[0]):
        assert w[i].tolist() == ids[i * seq : (i + 1) * seq]
    assert eval_windows(tok, spec, seq, max_windows=3).tolist() == w[:3].tolist()
    b = eval_windows(tok, spec, seq, max_windows=5, add_bos=True)
    assert b.shape == (5, seq)
    for i in range(5):
        assert b[i].tolist() == [tok.bos_token_id] + ids[i * (seq - 1) : (i + 1) * (seq - 1)]


def test_calibration_seeded_and_in_bounds(tok, cache, text_file):
    spec = f"text:{text_file}"
    ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"])
    n, seq = 32, 64
    a = calibration_samples(tok, spec, n, seq, seed=0)
    assert a.shape == (n, seq)
    assert torch.equal(a, calibration_samples(tok, spec, n, seq, seed=0))
    assert not torch.equal(a, calibration_samples(tok, spec, n, seq, seed=1))
    offsets = torch.randint(0, len(ids) - seq + 1, (n,), generator=torch.Generator().manual_seed(0))
    for row, o in zip(a, offsets.tolist(), strict=True):
        assert torch.equal(row, ids[o : o + seq])
    # offsets cover [0, len - seq] inclusive and nothing past it
    seq = len(ids) - 3
    rows = calibration_samples(tok, spec, 200, seq, seed=5)
    found = {next(o for o in range(4) if torch.equal(r, ids[o : o + seq])) for r in rows}
    assert found == {0, 1, 2, 3}
    assert torch.equal(calibration_samples(tok, spec, 2, len(ids)), torch.stack([ids, ids]))


def test_token_cache_never_stale(tok, cache, text_file, monkeypatch):
    spec = f"text:{text_file}"
    first = token_ids(tok, spec)
    assert len(list((cache / "tokens").glob("*.pt"))) == 1

    def boom(*_args, **_kwargs):
        raise AssertionError("tokenized again instead of using the cache")

    with monkeypatch.context() as m:
        m.setattr(windows_mod, "tokenize_text", boom)
        assert torch.equal(token_ids(tok, spec), first)
    text_file.write_text("Anne was here.\n" + TEXT, encoding="utf-8")
    changed = token_ids(tok, spec)
    assert changed.tolist() == tok("Anne was here.\n" + TEXT, add_special_tokens=False)["input_ids"]


# --- Austen container format and fetch (offline, synthetic) ---------------------------


def _r_serialize(obj) -> bytes:
    from rdata.conversion import convert_python_to_r_data
    from rdata.unparser import unparse_data

    return unparse_data(convert_python_to_r_data(obj), file_format="xdr", file_type="rds")


def _write_lazyload(data_dir: Path, objects: dict, index_gzip: bool = True, xz: bool = False) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    blobs, variables, offset = b"", {}, 0
    for name, obj in objects.items():
        raw = _r_serialize(obj)
        body = b"X" + lzma.compress(raw) if xz else zlib.compress(raw)
        blob = struct.pack(">I", len(raw)) + body
        variables[name] = np.array([offset, len(blob)], dtype=np.int32)
        blobs, offset = blobs + blob, offset + len(blob)
    flag = np.array([3], dtype=np.int32) if xz else np.array([True])
    index = _r_serialize({"variables": variables, "references": {}, "compressed": flag})
    rdx = gzip.compress(index) if index_gzip else struct.pack(">I", len(index)) + zlib.compress(index)
    (data_dir / "Rdata.rdx").write_bytes(rdx)
    (data_dir / "Rdata.rdb").write_bytes(blobs)


@pytest.mark.parametrize("index_gzip,xz", [(True, False), (False, False), (False, True)])
def test_read_lazyload(tmp_path, index_gzip, xz):
    objects = {"persuasion": np.array(["Persuasion", "", "by Jane Austen", "café"]), "other": np.array(["x"])}
    _write_lazyload(tmp_path, objects, index_gzip=index_gzip, xz=xz)
    got = austen.read_lazyload(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb")
    assert sorted(got) == ["other", "persuasion"]
    assert austen.lines_to_text(got["persuasion"]) == "Persuasion\n\nby Jane Austen\ncafé"


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_from_deb_file(tmp_path, cache, monkeypatch):
    root = tmp_path / "pkg"
    novels = {r: np.array([f"{r.upper()}", "", f"text of {r}"]) for r, _ in austen.NOVELS.values()}
    _write_lazyload(root / "usr/lib/R/site-library/janeaustenr/data", novels)
    (root / "DEBIAN").mkdir()
    control = "Package: r-cran-janeaustenr\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    (root / "DEBIAN/control").write_text(control)
    deb = tmp_path / "r-cran-janeaustenr_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(root), str(deb)], check=True, capture_output=True)
    monkeypatch.setenv(austen.DEB_ENV, str(deb))
    assert load_text("austen:eval") == "PERSUASION\n\ntext of persuasion"
    assert (cache / "austen/persuasion.txt").is_file()
    pride, northanger = "PRIDEPREJUDICE\n\ntext of prideprejudice", "NORTHANGERABBEY\n\ntext of northangerabbey"
    assert load_text("austen:eval2") == pride + "\n\n" + northanger
    monkeypatch.setenv(austen.DEB_ENV, str(tmp_path / "missing.deb"))
    assert load_text("austen:emma").startswith("EMMA")  # cached: no fetch needed
    (cache / "austen/emma.txt").unlink()
    _raises("is not a file", load_text, "austen:emma")


def test_fetch_without_apt(cache, monkeypatch):
    monkeypatch.delenv(austen.DEB_ENV, raising=False)
    monkeypatch.setattr(austen.shutil, "which", lambda _name: None)
    _raises("apt-get/dpkg-deb not found", load_text, "austen:persuasion")


# --- real corpus and tokenizer ----------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from llmpress.models.smollm2 import ensure_smollm2

    return AutoTokenizer.from_pretrained(ensure_smollm2())


@pytest.mark.real
def test_real_austen_splits():
    starts = {"emma": "EMMA\n\nBy Jane Austen", "persuasion": "Persuasion\n\n\nby\n\nJane Austen",
              "pride": "PRIDE AND PREJUDICE", "sense": "SENSE AND SENSIBILITY",
              "mansfield": "MANSFIELD PARK", "northanger": "NORTHANGER ABBEY"}  # fmt: skip
    texts = {name: load_text(f"austen:{name}") for name in starts}
    for name, start in starts.items():
        assert texts[name].startswith(start), name
    assert load_text("austen:eval") == texts["persuasion"]
    assert load_text("austen:calib") == "\n\n".join(texts[n] for n in ["emma", "mansfield", "sense"])
    assert load_text("austen:eval2") == texts["pride"] + "\n\n" + texts["northanger"]
    assert 4_000_000 < sum(map(len, texts.values())) < 4_060_000


@pytest.mark.real
def test_real_persuasion_tokens_and_windows(smollm2):
    ids = token_ids(smollm2, "austen:eval")
    assert 113_000 < len(ids) < 119_000  # assets.md: ~116k SmolLM2 tokens
    w = eval_windows(smollm2, "austen:eval", 1024, max_windows=16)
    assert w.shape == (16, 1024)
    assert torch.equal(w, ids[: 16 * 1024].view(16, 1024))
    assert smollm2.decode(w[0, :8]).startswith("Persuasion\n\n\nby")

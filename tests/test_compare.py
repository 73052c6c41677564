"""`llmpress compare`: several folders on the same windows, one report with plots; bad input writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmpress import compress
from llmpress.cli import _compare_folders, main
from llmpress.errors import LlmpressError
from tiny_models import TOKENIZER_TEXT, tiny_model, tiny_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny base folder with a tokenizer, an rtn-w4-g64 and a magnitude-50 folder of it, and a text spec.

    The w4 folder's llmpress.json is given known per-layer output errors (whatever the engine recorded)."""
    root = tmp_path_factory.mktemp("compare")
    tok = tiny_tokenizer()
    base = root / "base"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    compress(str(base), "rtn-w4-g64", out=root / "w4")
    compress(str(base), "magnitude-50", out=root / "m50")
    meta_file = root / "w4" / "llmpress.json"
    meta = json.loads(meta_file.read_text())
    for k, record in enumerate(meta["layers"].values()):
        record["output_error"] = 0.01 * (k + 1)
    meta["blocks"] = {"model.layers.0": {"output_error": 0.5}}
    meta_file.write_text(json.dumps(meta))
    text = root / "text.txt"
    text.write_text(TOKENIZER_TEXT * 4)
    return root, base, f"text:{text}"


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


WINDOWS = ("--seq-len", "16", "--max-windows", "2", "--no-speed", "--quiet")


def test_compare_writes_one_report_with_plots(folders, tmp_path, capsys):
    root, base, data = folders
    report, as_json = tmp_path / "report", tmp_path / "r.json"
    code, out, err = _run(capsys, "compare", root / "w4", root / "m50", "--base", base, "--data", data, *WINDOWS,
                          "--report", report, "--json", as_json)
    assert code == 0, err
    obj = json.loads((report / "report.json").read_text())
    rows = obj["rows"]
    assert [r["name"] for r in rows] == [f"{base} (base)", "w4", "m50"] and obj["base"] == f"{base} (base)"
    assert len({r["tokens"] for r in rows}) == 1  # the same windows for every model
    assert rows[1]["errors"]["metric"] == "output_error" and rows[1]["errors"]["blocks"] == {"model.layers.0": 0.5}
    assert sorted(rows[1]["errors"]["layers"].values())[:2] == pytest.approx([0.01, 0.02])
    assert json.loads(as_json.read_text()) == obj
    md = (report / "report.md").read_text()
    for name in ("size_vs_perplexity.png", "layer_errors.png"):
        assert (report / name).read_bytes().startswith(PNG) and f"]({name})" in md
    assert "| w4 |" in out and "| m50 |" in out


def test_compare_without_base_is_relative_to_the_first_folder(folders, tmp_path, capsys):
    root, base, data = folders
    code, out, err = _run(capsys, "compare", root / "m50", root / "w4", "--data", data, *WINDOWS,
                          "--report", tmp_path / "r")
    assert code == 0, err
    assert "Δppl % is relative to `m50`" in (tmp_path / "r" / "report.md").read_text()


def test_compare_applies_one_kv_cache_setting_to_every_model(folders, tmp_path, capsys):
    root, base, data = folders
    code, _out, err = _run(capsys, "compare", root / "w4", root / "m50", "--base", base, "--data", data, *WINDOWS,
                           "--kv-bits", "4", "--json", tmp_path / "r.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["kv_cache"]["bits"] for r in rows] == [4, 4, 4]
    plain = json.loads(_json_of(capsys, tmp_path / "plain.json", root, base, data).read_text())["rows"]
    assert all("kv_cache" not in r for r in plain)
    assert all(a["perplexity"] != b["perplexity"] for a, b in zip(rows, plain))  # the 4-bit cache was used


def _json_of(capsys, out: Path, root: Path, base: Path, data: str) -> Path:
    code, _out, err = _run(capsys, "compare", root / "w4", root / "m50", "--base", base, "--data", data, *WINDOWS,
                           "--json", out)
    assert code == 0, err
    return out


def _refused(capsys, folder: Path, argv, needle: str) -> None:
    before = sorted(p.name for p in folder.iterdir())
    code, _out, err = _run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("llmpress: error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir()) == before, "something was written"


def test_compare_bad_input_writes_nothing(folders, tmp_path, capsys):
    root, base, data = folders
    report = tmp_path / "report"
    common = ["--data", data, *WINDOWS, "--report", report]
    _refused(capsys, tmp_path, ["compare", root / "w4", tmp_path / "missing", *common],
             f"compare: folder {tmp_path / 'missing'} does not exist: pass model folders written by")
    (tmp_path / "file.txt").write_text("x")
    _refused(capsys, tmp_path, ["compare", root / "w4", tmp_path / "file.txt", *common], "is not a folder")
    _refused(capsys, tmp_path, ["compare", root / "w4", root / "m50" / ".." / "w4", *common],
             "is the same folder as")
    report.mkdir()
    _refused(capsys, tmp_path, ["compare", root / "w4", *common], "already exists: choose a new --report path")
    _refused(capsys, tmp_path, ["compare", root / "w4", "--data", data, "--seq-len", "1", "--report",
                                tmp_path / "r2"], "--seq-len 1 is too small")
    code, _out, err = _run(capsys, "compare")
    assert code == 2 and "llmpress: error:" in err and "folders" in err


def test_compare_names_rows_by_folder_unless_names_clash(tmp_path):
    for path in ("a/run", "b/run", "c/other"):
        (tmp_path / path).mkdir(parents=True)
    got = _compare_folders([str(tmp_path / "a/run"), str(tmp_path / "b/run"), str(tmp_path / "c/other")])
    assert [name for name, _ in got] == [str(tmp_path / "a/run"), str(tmp_path / "b/run"), "other"]
    with pytest.raises(LlmpressError, match="pass each folder once"):
        _compare_folders([str(tmp_path / "a/run"), str(tmp_path / "a" / "run") + "/"])

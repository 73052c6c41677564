"""Bad input: one line naming the problem and the fix, exit code 2, nothing written."""

import json

import pytest

from llmpress import cli
from llmpress.cli import main
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(path)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_case(capsys, tmp_path, argv, needle):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _out, err = run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("llmpress: error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_missing_path(capsys, tmp_path):
    _error_case(capsys, tmp_path, ["compress", tmp_path / "nope", "--recipe", "rtn-w4-g64", "--out", tmp_path / "o"],
                "not found: it is not an existing path, an alias (smollm2-135m) or a hub id")


def test_unknown_alias(capsys, tmp_path):
    _error_case(capsys, tmp_path, ["eval", "smollm2-999m"], "model 'smollm2-999m' not found")


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _error_case(capsys, tmp_path, ["eval", tmp_path / "empty"], "has no config.json")


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(folder)
    _error_case(capsys, tmp_path, ["compress", folder, "--recipe", "rtn-w4-g64", "--out", tmp_path / "o"],
                "unsupported architecture 'bert'")


def test_malformed_recipe(capsys, tmp_path, tiny_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [{method: rtn, args: {bitz: 4}}]\n")
    _error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", bad, "--out", tmp_path / "o"],
                "unknown key 'bitz'")


def test_unknown_recipe(capsys, tmp_path, tiny_dir):
    _error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", "gptq-w5", "--out", tmp_path / "o"],
                "unknown recipe 'gptq-w5'")


@pytest.mark.parametrize("args, needle", [
    ("{bits: 9, group_size: 64}", "bits=9 is out of range: use an integer from 2 to 8"),
    ("{bits: 4, group_size: 0}", "group_size=0 is invalid"),
])
def test_bits_out_of_range(capsys, tmp_path, tiny_dir, args, needle):
    bad = tmp_path / "bits.yaml"
    bad.write_text(f"stages: [{{method: rtn, args: {args}}}]\n")
    _error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", bad, "--out", tmp_path / "o"], needle)


def test_ratio_out_of_range(capsys, tmp_path, tiny_dir):
    bad = tmp_path / "ratio.yaml"
    bad.write_text("stages: [{method: magnitude, args: {sparsity: 1.2}}]\n")
    _error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", bad, "--out", tmp_path / "o"],
                "sparsity=1.2 is out of range: use a fraction in [0, 1)")


def test_output_folder_exists(capsys, tmp_path, tiny_dir):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    _error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", out],
                "already exists: choose a new --out path")
    assert (out / "mine.txt").read_text() == "precious"


def test_bad_data_spec(capsys, tmp_path, tiny_dir):
    _error_case(capsys, tmp_path, ["eval", tiny_dir, "--data", "wiki:foo"], "wiki:foo")


def test_bad_device(capsys, tmp_path, tiny_dir):
    _error_case(capsys, tmp_path, ["compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", tmp_path / "o",
                                   "--device", "cuda:7"], "is not available here: use --device cpu")


def test_json_exists(capsys, tmp_path, tiny_dir):
    target = tmp_path / "r.json"
    target.write_text("{}")
    _error_case(capsys, tmp_path, ["eval", tiny_dir, "--json", target], "--json")
    assert json.loads(target.read_text()) == {}


def test_compress_writes_folder(capsys, tmp_path, tiny_dir):
    out = tmp_path / "w4"
    code, text, _err = run(capsys, "compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", out, "--quiet")
    assert code == 0 and "compressed 14 linear layers" in text
    assert (out / "config.json").is_file() and (out / "llmpress.json").is_file()
    tools = ["llmpress", "transformers (compressed-tensors)", "vLLM", "lm-eval"]
    assert f"readable by: {', '.join(tools)}\n" in text
    assert json.loads((out / "llmpress.json").read_text())["readers"] == tools


@pytest.mark.parametrize(("fmt", "line"), [
    ("dense", "readable by: llmpress, transformers, vLLM, lm-eval\n"),
    ("compressed-tensors", "readable by: llmpress only (other tools refuse it;"),
])
def test_compress_says_who_reads_the_folder(capsys, tmp_path, tiny_dir, fmt, line):
    out = tmp_path / fmt
    code, text, _err = run(capsys, "compress", tiny_dir, "--recipe", "magnitude-50", "--out", out, "--format", fmt,
                           "--quiet")
    assert code == 0 and line in text
    saved = json.loads((out / "llmpress.json").read_text())["readers"]
    assert saved == (["llmpress"] if fmt == "compressed-tensors" else ["llmpress", "transformers", "vLLM", "lm-eval"])


def test_recipes_lists_builtins(capsys):
    code, text, _ = run(capsys, "recipes")
    assert code == 0 and "rtn-w4-g64" in text and "magnitude-50" in text


def test_quiet_silences_library_bars(capsys, monkeypatch):
    # as transformers' GGUF reader builds its bar, already imported
    from tqdm.auto import tqdm

    def noisy(_args):
        for _ in tqdm(range(3), desc="a library's own bar"):
            pass

    monkeypatch.setitem(cli.COMMANDS, "fetch", noisy)
    assert cli.main(["fetch", "--quiet"]) == 0
    assert "a library's own bar" not in capsys.readouterr().err
    assert cli.main(["fetch"]) == 0
    assert "a library's own bar" in capsys.readouterr().err

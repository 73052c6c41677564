"""``llmpress inspect``: the worst layers and blocks of a folder, and where two folders differ, read from
``llmpress.json`` alone; bad input is one line and exit 2."""

import json

import pytest

from llmpress import compress
from llmpress.cli import main
from llmpress.measure.inspect import block_of, compare, format_summary, layer_type, summarize
from tiny_models import TOKENIZER_TEXT, tiny_model, tiny_tokenizer


def _write(folder, layers, blocks=None, recipe="r"):
    folder.mkdir()
    meta = {"recipe": {"name": recipe}, "layers": layers, "notes": []}
    if blocks is not None:
        meta["blocks"] = blocks
    (folder / "llmpress.json").write_text(json.dumps(meta))
    return folder


LAYERS = {f"model.layers.{i}.{kind}": {"method": "gptq", "bits": 4, "output_error": value}
          for i, row in enumerate([(0.01, 0.02, 0.30), (0.03, 0.01, 0.10), (0.02, 0.05, 0.20)])
          for kind, value in zip(("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"), row)}
BLOCKS = {"model.layers.0": {"output_error": 0.004}, "model.layers.1": {"output_error": 0.001},
          "model.layers.2": {"output_error": 0.009}}


def test_names():
    assert layer_type("model.layers.12.self_attn.q_proj") == "self_attn.q_proj"
    assert layer_type("transformer.h.3.attn.c_proj") == "attn.c_proj"
    assert layer_type("model.layers.1.mlp.experts.7.down_proj") == "mlp.experts.*.down_proj"
    assert layer_type("lm_head") == "lm_head" and block_of("lm_head") is None
    assert block_of("model.layers.12.self_attn.q_proj") == "model.layers.12"


def test_summary_ranks_layers_blocks_and_types(tmp_path):
    folder = _write(tmp_path / "a", LAYERS, BLOCKS)
    summary = summarize(folder, top=2)
    assert [r["name"] for r in summary["worst_layers"]] == ["model.layers.0.mlp.down_proj",
                                                            "model.layers.2.mlp.down_proj"]
    assert [r["name"] for r in summary["worst_blocks"]] == ["model.layers.2", "model.layers.0"]
    types = summary["by_type"]
    assert list(types) == ["mlp.down_proj", "self_attn.o_proj", "self_attn.q_proj"]
    assert types["mlp.down_proj"]["mean"] == pytest.approx(0.2) and types["self_attn.o_proj"]["count"] == 3
    assert types["self_attn.o_proj"]["worst"] == "model.layers.2.self_attn.o_proj"
    text = format_summary(summary)
    assert "model.layers.0.mlp.down_proj" in text and "3.000e-01" in text and "model.layers.2" in text


def test_weight_errors_are_ranked_when_that_is_all_there_is(tmp_path):
    layers = {"model.layers.0.mlp.up_proj": {"weight_error": 0.01},
              "model.layers.0.mlp.down_proj": {"weight_error": 0.02}}
    summary = summarize(_write(tmp_path / "w", layers), top=5)
    assert summary["metric"] == "weight_error" and summary["worst_blocks"] == []
    assert summary["worst_layers"][0]["name"] == "model.layers.0.mlp.down_proj"
    assert "no calibration data" in format_summary(summary)


def test_blocks_only(tmp_path):
    """A smoothing recipe (AWQ) records block errors only: they are shown, and compared."""
    layers = {"model.layers.0.mlp.up_proj": {"method": "awq+rtn", "bits": 4}}
    a = _write(tmp_path / "a", layers, BLOCKS)
    b = _write(tmp_path / "b", layers, {"model.layers.0": {"output_error": 1}})
    summary = summarize(a)
    assert summary["worst_layers"] == [] and summary["worst_blocks"][0]["name"] == "model.layers.2"
    assert "worst linears" not in format_summary(summary) and "model.layers.2" in format_summary(summary)
    result = compare(a, b)
    assert result["layers"] == [] and [r["name"] for r in result["blocks"]] == ["model.layers.0"]


def test_compare_sorts_by_the_difference(tmp_path):
    a = _write(tmp_path / "a", LAYERS, BLOCKS, recipe="gptq")
    worse = {name: dict(rec, output_error=rec["output_error"] * (5 if name.endswith("o_proj") else 1.1))
             for name, rec in LAYERS.items()}
    b = _write(tmp_path / "b", worse, {**BLOCKS, "model.layers.1": {"output_error": 0.05}}, recipe="rtn")
    result = compare(a, b, top=3)
    assert result["layers"][0]["name"] == "model.layers.2.self_attn.o_proj"  # 0.05 -> 0.25: the largest gap
    assert result["layers"][0]["ratio"] == pytest.approx(5)
    assert result["by_type"][0]["type"] == "self_attn.o_proj"
    assert result["blocks"][0]["name"] == "model.layers.1" and result["blocks"][0]["diff"] == pytest.approx(0.049)
    assert result["a"]["recipe"] == "gptq" and result["b"]["recipe"] == "rtn"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny llama compressed with gptq-w4-g64 and with rtn-w4-g64, both on the same calibration text."""
    root = tmp_path_factory.mktemp("inspect")
    tok = tiny_tokenizer()
    text = root / "calib.txt"
    text.write_text(TOKENIZER_TEXT * 3)
    out = {}
    for recipe in ("gptq-w4-g64", "rtn-w4-g64"):
        out[recipe] = root / recipe
        compress(tiny_model("llama", seed=2, vocab_size=len(tok)), recipe, tokenizer=tok, data=f"text:{text}",
                 samples=4, seq_len=16, out=out[recipe])
    return out


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_names_the_worst_layers_of_a_gptq_folder(capsys, folders, tmp_path):
    meta = json.loads((folders["gptq-w4-g64"] / "llmpress.json").read_text())
    ranked = sorted(meta["layers"], key=lambda n: -meta["layers"][n]["output_error"])
    code, out, err = run(capsys, "inspect", folders["gptq-w4-g64"], "--top", 3, "--json", tmp_path / "i.json")
    assert code == 0, err
    worst = out.split("worst linears")[1].split("by layer type")[0]
    assert [line.split()[0] for line in worst.strip().splitlines()[2:]] == ranked[:3]
    assert "worst blocks" in out and "model.layers.1" in out
    written = json.loads((tmp_path / "i.json").read_text())
    assert [r["name"] for r in written["worst_layers"]] == ranked[:3] and written["recipe"] == "gptq-w4-g64"


def test_inspect_two_folders(capsys, folders):
    code, out, err = run(capsys, "inspect", folders["gptq-w4-g64"], folders["rtn-w4-g64"])
    assert code == 0, err
    assert "differs most" in out and "B / A" in out and "(rtn-w4-g64)" in out


@pytest.mark.parametrize("case,needle", [
    ("missing", "does not exist"),
    ("no-meta", "has no llmpress.json"),
    ("no-records", "has no per-layer error records"),
    ("bad-json", "is not valid JSON"),
])
def test_inspect_bad_folders(capsys, tmp_path, case, needle):
    folder = tmp_path / case
    if case != "missing":
        folder.mkdir()
    if case == "no-records":
        (folder / "llmpress.json").write_text(json.dumps({"layers": {"model.layers.0.mlp.up_proj": {"bits": 4}}}))
    if case == "bad-json":
        (folder / "llmpress.json").write_text("{")
    code, out, err = run(capsys, "inspect", folder)
    lines = [line for line in err.splitlines() if line.startswith("llmpress: error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_inspect_bad_arguments(capsys, tmp_path):
    folder = _write(tmp_path / "a", LAYERS, BLOCKS)
    for argv, needle in [(["--top", "0"], "--top 0"), ([folder, folder], "one folder, or two"),
                         (["--json", folder / "llmpress.json"], "already exists")]:
        code, _out, err = run(capsys, "inspect", folder, *argv)
        assert code == 2 and needle in err and err.count("\n") == 1, err
    weights = _write(tmp_path / "w", {"model.layers.0.mlp.up_proj": {"weight_error": 0.1}})
    no_blocks = _write(tmp_path / "o", {"model.layers.0.mlp.up_proj": {"output_error": 0.1}})
    code, _out, err = run(capsys, "inspect", weights, no_blocks)
    assert code == 2 and "no layer or block with the same kind" in err, err

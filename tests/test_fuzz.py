"""Fuzzing the command line with bad input (issue 19): mutated safetensors and GGUF headers, recipes (YAML files
and the NAME(args) syntax), data specs and CLI flags.

Every generated input is bad by construction; for each the CLI must exit 2 with exactly one ``llmpress: error:``
line, no traceback, and nothing written beside the output. Deterministic (``derandomize=True``, no example
database) so CI sees the same inputs every run; tiny models only, and every input fails before any compute,
so the whole file takes seconds. Each test checks it ran its quota, over 500 inputs in all.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from llmpress.cli import main
from llmpress.data import austen
from llmpress.recipe import CALIBRATION_DTYPES
from llmpress.registry import builtin_recipes, methods
from tiny_models import tiny_gguf, tiny_model, tiny_tokenizer

METHODS = methods()
BUILTIN_RECIPES = builtin_recipes()


def fuzz(n: int):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def tiny_dir(root) -> Path:
    path = root / "tiny"
    tiny_model("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok_dir(root) -> Path:
    path = root / "tinytok"
    tok = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@contextlib.contextmanager
def workspace(root: Path):
    """A fresh (inputs folder, output parent folder) pair for one example."""
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        inputs, parent = Path(tmp) / "in", Path(tmp) / "out"
        inputs.mkdir()
        parent.mkdir()
        yield inputs, parent


def refused(argv: list, parent: Path) -> str:
    """Run the CLI: exit 2, exactly one error line, no traceback, nothing new in ``parent``; returns the line."""
    before = sorted(os.listdir(parent))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    text = err.getvalue()
    lines = [line for line in text.splitlines() if line.startswith("llmpress: error:")]
    assert code == 2, (argv, text)
    assert len(lines) == 1, (argv, text)
    assert "Traceback" not in text + out.getvalue(), (argv, text)
    assert sorted(os.listdir(parent)) == before, argv
    return lines[0]


def run_quota(check, quota: int) -> None:
    """Run the hypothesis test ``check`` and assert it saw at least ``quota`` inputs."""
    seen: list[int] = []
    check(seen)
    print(f"{check.__name__}: {len(seen)} inputs")  # shown with pytest -s
    assert len(seen) >= quota, f"only {len(seen)} inputs generated"


# ---------------------------------------------------------------- safetensors headers


def _same_checkpoint(data: bytes, original: dict) -> bool:
    """Whether ``data`` is a readable safetensors file with the original tensor names and shapes (a valid file
    with other numbers in it, e.g. a dtype letter or an offset swapped: not bad input, so not generated)."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception:  # noqa: BLE001 - any failure to read means the mutation broke the file
        return False
    return {k: tuple(v.shape) for k, v in tensors.items()} == original


@st.composite
def mutated_safetensors(draw, original: bytes) -> bytes:
    size = struct.unpack("<Q", original[:8])[0]
    data = bytearray(original)
    kind = draw(st.sampled_from(["truncate", "length", "bytes", "splice"]))
    if kind == "truncate":
        cut = draw(st.one_of(st.integers(0, 8 + size), st.integers(0, len(original) - 1)))
        return bytes(data[:cut])
    if kind == "length":
        data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1).filter(lambda v: v != size)))
        return bytes(data)
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(8, 7 + size))] = draw(st.integers(0, 255))
        return bytes(data)
    start = draw(st.integers(8, 8 + size))
    end = draw(st.integers(start, min(8 + size, start + 40)))
    data[start:end] = draw(st.binary(max_size=40))
    return bytes(data)


def test_fuzz_safetensors_headers(root, tiny_dir):
    from safetensors.torch import load

    original = (tiny_dir / "model.safetensors").read_bytes()
    shapes = {k: tuple(v.shape) for k, v in load(original).items()}
    config = (tiny_dir / "config.json").read_text()

    @fuzz(130)
    @given(data=mutated_safetensors(original), command=st.sampled_from(["eval", "compress"]))
    def safetensors_headers(seen, data, command):
        assume(not _same_checkpoint(data, shapes))
        seen.append(1)
        with workspace(root) as (inputs, parent):
            model = inputs / "model"
            model.mkdir()
            (model / "config.json").write_text(config)
            (model / "model.safetensors").write_bytes(data)
            extra = ["--recipe", "rtn-w4-g64", "--out", parent / "o"] if command == "compress" else ["--quiet"]
            refused([command, model, *extra], parent)

    run_quota(safetensors_headers, 100)


# ---------------------------------------------------------------- GGUF headers


@st.composite
def mutated_gguf(draw, original: bytes) -> bytes:
    """The right magic, then a cut or corrupted header (the tensor data is the tail after ~230 bytes)."""
    data = bytearray(original)
    kind = draw(st.sampled_from(["truncate", "bytes", "splice", "counts"]))
    if kind == "truncate":
        return bytes(data[:draw(st.integers(4, len(original)))])
    if kind == "counts":  # version, tensor count, key-value count: 4 + 8 + 8 bytes after the magic
        start = draw(st.sampled_from([4, 8, 16]))
        width = 4 if start == 4 else 8
        data[start:start + width] = draw(st.integers(0, 2**(8 * width) - 1)).to_bytes(width, "little")
        return bytes(data)
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(4, 260))] = draw(st.integers(0, 255))
        return bytes(data)
    start = draw(st.integers(4, 260))
    data[start:start + draw(st.integers(0, 40))] = draw(st.binary(max_size=40))
    return bytes(data)


def test_fuzz_gguf_headers(root):
    original = tiny_gguf(root / "base.gguf").read_bytes()
    assert original[:4] == b"GGUF"

    @fuzz(100)
    @given(data=mutated_gguf(original))
    def gguf_headers(seen, data):
        seen.append(1)
        with workspace(root) as (inputs, parent):
            model = inputs / "m.gguf"
            model.write_bytes(data)
            refused(["compress", model, "--recipe", "rtn-w4-g64", "--out", parent / "o", "--quiet"], parent)

    run_quota(gguf_headers, 100)


# ---------------------------------------------------------------- YAML recipes

VALID_STAGES = [
    {"method": "rtn", "args": {"bits": 4, "group_size": 64}},
    {"method": "magnitude", "args": {"sparsity": 0.5}},
    {"method": "gptq", "args": {"bits": 4, "group_size": 64}},
    {"method": "wanda", "args": {"sparsity": 0.5}},
    {"method": "kv-cache", "args": {"bits": 8}},
    {"method": "rtn", "targets": ["*.mlp.*"], "ignore": ["*.down_proj"]},
]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                    st.text(max_size=12))
WRONG_TYPES = st.one_of(st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                            max_size=2))
UNKNOWN_KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).map(lambda k: f"zz_{k}")
BAD_BITS = st.one_of(st.integers(-100, 1), st.integers(9, 15), st.integers(17, 10**9), st.text(max_size=5),
                     st.floats(0.5, 7.5).filter(lambda v: v != int(v)))
BAD_FLAG = st.one_of(st.sampled_from(["maybe", "no", "off", "yes please", "1", "0"]), st.integers(-3, 3),
                     st.none(), st.floats(allow_nan=False))
BAD_GROUP = st.one_of(st.integers(-10**6, 0).filter(lambda v: v != -1), st.text(max_size=4), st.floats(1.5, 99.5))
BAD_FRACTION = st.one_of(st.floats(1.0, 1e9), st.floats(-1e9, -1e-9), st.text(min_size=1, max_size=4))


@st.composite
def poisoned_recipe(draw) -> dict:
    """A recipe built from valid stages with one thing that makes it invalid whatever else it holds."""
    recipe: dict = {"stages": [dict(s, args=dict(s.get("args", {})))
                               for s in draw(st.lists(st.sampled_from(VALID_STAGES), min_size=1, max_size=3))]}
    if draw(st.booleans()):
        recipe["calibration"] = {"samples": 4, "seq_len": 8}
    stage = draw(st.sampled_from(recipe["stages"]))
    poison = draw(st.sampled_from(["top-key", "stage-key", "arg-key", "stages", "method", "bits", "sym", "group",
                                   "fraction", "calibration", "patterns", "name", "deep"]))
    if poison == "top-key":
        recipe[draw(UNKNOWN_KEY)] = draw(SCALARS)
    elif poison == "stage-key":
        stage[draw(UNKNOWN_KEY)] = draw(SCALARS)
    elif poison == "arg-key":
        stage["args"] = {**stage.get("args", {}), draw(UNKNOWN_KEY): draw(SCALARS)}
    elif poison == "stages":
        recipe["stages"] = draw(st.one_of(st.just([]), SCALARS, st.dictionaries(st.text(max_size=3), SCALARS)))
    elif poison == "method":
        stage["method"] = draw(st.one_of(st.text(max_size=12).filter(lambda m: m not in METHODS), WRONG_TYPES,
                                         st.none(), st.integers()))
    elif poison in ("bits", "sym", "group", "fraction"):
        key = {"bits": "bits", "sym": "sym", "group": "group_size", "fraction": "sparsity"}[poison]
        bad = {"bits": BAD_BITS, "sym": BAD_FLAG, "group": BAD_GROUP, "fraction": BAD_FRACTION}[poison]
        stage["args"] = {**stage.get("args", {}), key: draw(st.one_of(bad, WRONG_TYPES))}
    elif poison == "calibration":
        key, bad = draw(st.sampled_from([("samples", st.integers(-5, 0)), ("seq_len", st.text(max_size=3)),
                                         ("seed", st.one_of(st.text(max_size=3), st.floats())),
                                         ("dtype", st.text(max_size=6).filter(lambda d: d not in CALIBRATION_DTYPES)),
                                         ("batch_size", st.integers(-3, 0)),
                                         ("data", st.one_of(st.integers(), st.sampled_from(["wiki:x", "austen:",
                                                                                           "austen:nope", "x"]))),
                                         ("zz", SCALARS)]))
        recipe["calibration"] = {**recipe.get("calibration", {}), key: draw(bad)}
    elif poison == "patterns":
        stage[draw(st.sampled_from(["targets", "ignore"]))] = draw(st.one_of(st.integers(), st.lists(st.integers(),
                                                                                                  min_size=1)))
    elif poison == "name":
        recipe["name"] = draw(WRONG_TYPES)
    else:
        recipe = {"stages": [recipe]}
        for _ in range(draw(st.integers(51, 120))):
            recipe = [recipe]
    return recipe


@st.composite
def bad_recipe_file(draw) -> bytes:
    kind = draw(st.sampled_from(["poisoned", "poisoned", "poisoned", "text", "bytes", "brackets"]))
    if kind == "poisoned":
        flow = draw(st.sampled_from([None, True, False]))
        text = yaml.safe_dump(draw(poisoned_recipe()), default_flow_style=flow, allow_unicode=True)
        return text.encode("utf-8")
    if kind == "text":  # YAML-ish punctuation: a parse error, or something that is not a recipe
        return draw(st.text(alphabet=" \n\t[]{}:,-?&*!|>'\"#%@`abcz019", max_size=80)).encode()
    if kind == "bytes":  # not UTF-8
        return draw(st.binary(max_size=60)) + b"\xff\xfe\x80"
    depth = draw(st.integers(51, 3000))
    return ("stages: " + "[" * depth + "{method: rtn}" + "]" * depth).encode()


def test_fuzz_yaml_recipes(root, tiny_dir):
    @fuzz(130)
    @given(content=bad_recipe_file(), suffix=st.sampled_from([".yaml", ".yml", ".json"]))
    def yaml_recipes(seen, content, suffix):
        seen.append(1)
        with workspace(root) as (inputs, parent):
            recipe = inputs / f"recipe{suffix}"
            recipe.write_bytes(content)
            refused(["compress", tiny_dir, "--recipe", recipe, "--out", parent / "o", "--quiet"], parent)

    run_quota(yaml_recipes, 120)


# ---------------------------------------------------------------- NAME(args) recipes

ONE_STAGE = sorted(n for n, r in BUILTIN_RECIPES.items() if len(r["stages"]) == 1)
NAMES = st.one_of(st.sampled_from(ONE_STAGE), st.sampled_from(sorted(METHODS)))
KEYS = st.sampled_from(["bits", "group_size", "sym", "mse", "sparsity", "pattern", "alpha", "keep", "steps",
                        "loss", "targets", "ignore", "act_order", "scope", "lr", "samples", "seq_len"])
VALUES = st.one_of(st.integers(-5, 300).map(str), st.sampled_from(["true", "false", "null", "0.5", "1e-3", "2:4",
                                                                   "[1, 2]", "{a: 1}", "'x'", '"y"', "[*.mlp.*]",
                                                                   "kl", "row"]),
                   st.text(alphabet="abcxyz019_.-:", min_size=1, max_size=6))
POISON_ARGS = st.one_of(
    st.sampled_from(["sym=maybe", "sym=no", "sym=off", "mse=yes", "group_size=0", "bits=1", "bits=9", "bits=0",
                     "bits=-4", "bits=x"]),
    UNKNOWN_KEY.map(lambda k: f"{k}=1"),
    st.integers(17, 10**6).map(lambda b: f"bits={b}"),
)


@st.composite
def bad_recipe_name(draw) -> str:
    kind = draw(st.sampled_from(["poisoned", "poisoned", "poisoned", "syntax", "unknown", "deep"]))
    if kind == "deep":
        depth = draw(st.integers(51, 5000))
        return f"{draw(NAMES)}(bits=" + "[" * depth + "]" * depth + ")"
    if kind == "unknown":
        junk = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=14))
        assume(junk not in BUILTIN_RECIPES and junk not in METHODS)
        return "+".join(draw(st.permutations([junk, *draw(st.lists(st.sampled_from(ONE_STAGE), max_size=2))])))
    args = [f"{draw(KEYS)}={draw(VALUES)}" for _ in range(draw(st.integers(0, 3)))]
    if kind == "syntax":
        call = f"{draw(NAMES)}({', '.join(args)})"
        broken = draw(st.sampled_from([call[:-1], call + ")", call + "x", "(" + call, call.replace("(", "[", 1),
                                       "+" + call, call + "+", call.replace("(", "(,", 1) if args else "(" + call,
                                       f"{draw(NAMES)}(({', '.join(args)})"]))
        return broken
    args.insert(draw(st.integers(0, len(args))), draw(POISON_ARGS))
    call = f"{draw(NAMES)}({', '.join(args)})"
    others = draw(st.lists(st.sampled_from(ONE_STAGE), max_size=2))
    return "+".join([*others, call] if draw(st.booleans()) else [call, *others])


def test_fuzz_recipe_names(root, tiny_dir):
    @fuzz(130)
    @given(spec=bad_recipe_name())
    def recipe_names(seen, spec):
        seen.append(1)
        with workspace(root) as (_inputs, parent):
            refused(["compress", tiny_dir, f"--recipe={spec}", "--out", parent / "o", "--quiet"], parent)

    run_quota(recipe_names, 120)


# ---------------------------------------------------------------- data specs


@st.composite
def bad_data_spec(draw, inputs: Path) -> str:
    """A text spec that cannot give calibration text: malformed, unknown, missing, undecodable or too short."""
    kind = draw(st.sampled_from(["scheme", "austen", "text-missing", "text-file", "jsonl", "hf", "malformed"]))
    word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12)
    if kind == "scheme":
        scheme = draw(word.filter(lambda s: s not in ("austen", "text", "jsonl", "hf")))
        return f"{scheme}:{draw(word)}"
    if kind == "malformed":
        return draw(st.sampled_from(["", ":", "austen", "text:", "jsonl:", "jsonl:x", "jsonl::f", "hf:",
                                     "austen:", "nocolon"]))
    if kind == "austen":
        return "austen:" + draw(word.filter(lambda n: n not in austen.valid_names()))
    if kind == "text-missing":
        return f"text:{inputs / draw(word)}.txt"
    if kind == "hf":
        return f"hf:fuzz-missing-{draw(word)}"
    path = inputs / "data"
    if kind == "text-file":
        body = draw(st.sampled_from([b"", b"the a of", b"caf\xe9 " * 50, b"\xff\xfe" + "ok ".encode("utf-16") * 40]))
        path.write_bytes(body)
        return f"text:{path}" if draw(st.booleans()) else f"text:{inputs}"  # a folder is not a file either
    path.write_bytes(draw(st.sampled_from([b'{"text": 5}', b'{"other": "x"}', b"[1, 2]", b"{bad json",
                                           b'"just a string"', b'{"text": "caf\\u00e9"}\n\xff\n',
                                           b'{"text": "the a of"}'])))
    return f"jsonl:{path}:text"


def test_fuzz_data_specs(root, tok_dir, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setattr("llmpress.data.sources.hub_unreachable", lambda timeout=3.0: "fuzz: no network")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    @fuzz(60)
    @given(st.data())
    def data_specs(seen, data):
        seen.append(1)
        with workspace(root) as (inputs, parent):
            spec = data.draw(bad_data_spec(inputs))
            command = data.draw(st.sampled_from(["compress", "eval"]))
            if command == "compress":
                argv = ["compress", tok_dir, "--recipe", "wanda-50", "--data", spec, "--samples", 2,
                        "--seq-len", 64, "--out", parent / "o", "--quiet"]
            else:
                argv = ["eval", tok_dir, "--data", spec, "--seq-len", 64, "--no-speed", "--json", parent / "r.json"]
            refused(argv, parent)

    run_quota(data_specs, 60)


# ---------------------------------------------------------------- CLI flags

INT_FLAGS = ["--samples", "--seq-len", "--seed", "--max-windows", "--kv-bits"]


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


@st.composite
def bad_command_line(draw, tiny_dir: Path, parent: Path) -> list[str]:
    """A command with some harmless flags and at least one error that is caught before any work."""
    command = draw(st.sampled_from(["compress", "eval", "demo", "fetch", "recipes"]))
    argv = [command]
    if command in ("compress", "eval"):
        argv.append(str(tiny_dir))
    if command == "compress":
        argv += ["--recipe", draw(st.sampled_from(["rtn-w4-g64", "magnitude-50", "wanda-50"])),
                 "--out", str(parent / "o")]
    if command != "recipes" and draw(st.booleans()):
        argv.append("--quiet")
    junk = st.text(alphabet="abcxyz-_:/.=019 ", min_size=1, max_size=10)
    poisons = ["unknown-flag", "int-flag", "device", "model", "extra"]
    if command == "compress":
        poisons += ["recipe", "out-exists", "out-missing-parent", "out-proc", "format", "samples", "no-out"]
    if command in ("eval", "demo"):
        poisons += ["seq-len", "max-windows", "json-exists", "json-missing-parent", "report-exists", "kv-bits"]
    poison = draw(st.sampled_from(poisons))
    if poison == "unknown-flag":
        argv.append("--zz-" + draw(st.text(alphabet="abcdefgh-", min_size=1, max_size=8)))
    elif poison == "int-flag":
        flag = draw(st.sampled_from(INT_FLAGS))
        argv += [f"{flag}={draw(junk.filter(lambda v: not _is_int(v)))}"]
    elif poison == "device":
        bad_devices = st.sampled_from(["meta", "mps", "xla", "cuda:9", "cuda:-1", "cpu:x", "gpu"])
        argv += [f"--device={draw(st.one_of(junk, bad_devices))}"]
    elif poison == "model":
        argv = ([argv[0], str(parent / "missing-model")] + argv[2:] if command in ("compress", "eval")
                else argv + [f"--model={parent / 'missing-model'}"] if command == "demo" else argv + ["model"])
    elif poison == "extra":
        argv.append(draw(junk.filter(lambda v: not v.startswith("-") and v.strip())))
    elif poison == "recipe":
        argv[argv.index("--recipe") + 1] = "zz-" + draw(junk)
    elif poison == "out-exists":
        (parent / "o").mkdir()
    elif poison == "out-missing-parent":
        argv[argv.index("--out") + 1] = str(parent / "missing" / "o")
    elif poison == "out-proc":
        argv[argv.index("--out") + 1] = "/proc/llmpress-fuzz"
    elif poison == "format":
        argv.append(f"--format={draw(junk)}")
    elif poison == "samples":
        argv += ["--samples", str(draw(st.integers(-10**6, 0)))]
    elif poison == "no-out":
        i = argv.index("--out")
        del argv[i:i + 2]
    elif poison == "seq-len":
        argv += ["--seq-len", str(draw(st.integers(-10**6, 1)))]
    elif poison == "max-windows":
        argv += ["--max-windows", str(draw(st.integers(-10**6, -1)))]
    elif poison in ("json-exists", "report-exists"):
        flag = "--json" if poison == "json-exists" else "--report"
        (parent / "taken").write_text("{}")
        argv += [flag, str(parent / "taken")]
    elif poison == "json-missing-parent":
        argv += [draw(st.sampled_from(["--json", "--report"])), str(parent / "missing" / "r")]
    else:
        argv += ["--kv-bits", str(draw(st.integers(-100, 100).filter(lambda b: b not in (2, 4, 8, 16))))]
    return argv


def test_fuzz_command_lines(root, tiny_dir):
    @fuzz(130)
    @given(st.data())
    def command_lines(seen, data):
        seen.append(1)
        with workspace(root) as (_inputs, parent):
            argv = data.draw(bad_command_line(tiny_dir, parent))
            refused(argv, parent)

    run_quota(command_lines, 120)


def test_refused_can_fail(root, tiny_dir):
    """The checker itself: a command that succeeds, or writes beside the output, is not 'refused'."""
    with workspace(root) as (_inputs, parent):
        with pytest.raises(AssertionError):
            refused(["recipes"], parent)
        with pytest.raises(AssertionError):
            refused(["compress", tiny_dir, "--recipe", "rtn-w4-g64", "--out", parent / "o", "--quiet"], parent)

"""Scale benchmark: peak memory and time of compressing checkpoints of real Llama shapes, llm-compressor beside it.

    python benchmarks/scale.py [--shapes 1b,8b] [--recipes rtn-w4-g64,gptq-w4-g64] [--peer | --no-peer]
                               [--work DIR] [--json FILE]

Issue 14's acceptance, measured on a 2-core, 24 GB machine. Each shape is a random checkpoint with the real
model's config and tensor names, shapes and dtype (bfloat16 safetensors, sharded like the real one, with the
default model's tokenizer): 8b = Llama-3.1-8B (untied head, ~16 GB, 4 shards), 3b = Llama-3.2-3B, 1b =
Llama-3.2-1B (tied embeddings, one file), tiny = a 4-layer self-check that runs in seconds. They are written
tensor by tensor (never the whole model in memory) under ``--work`` and reused by later runs.

Every step is the command a user types, run as its own process, measured from outside: peak RSS (the
kernel's high-water mark, ru_maxrss, of the process and its children, started through ``/usr/bin/time``;
file pages of memory-mapped checkpoints count, as they do for the kernel; in parentheses the sampled peak
of the anonymous part, without them) and wall time (start-up, imports and saving included; the corpus is
tokenized before anything is timed, and the checkpoint is read from whatever page cache the machine has):

1. ``llmpress plan DIR --recipe R --json F`` when the command exists: its predicted peak RAM, disk and time.
2. ``llmpress compress DIR --recipe R --out OUT`` (``--samples/--seq-len`` for recipes that calibrate).
3. ``llmpress eval OUT --max-windows 2 --seq-len 256 --no-speed``: that the result loads and runs.
4. llm-compressor 0.14 the way its docs load a model (whole model in memory, ``dtype="auto"``), on the same
   calibration token windows, with the quantization benchmark's modifiers (``benchmarks/scale_peer.py``):
   W4A16's grid with llmpress's group size, the head and embeddings left alone; then saved compressed.
   By default only on shapes whose checkpoint fits in a third of the machine's memory (--peer forces it).

Default jobs (issue 14): 8b with rtn-w4-g64, 1b with gptq-w4-g64 (128 x 512 calibration windows); other
shapes given with --shapes run rtn-w4-g64; with --recipes every shape runs every recipe. Prints one Markdown
table, then the issue's targets met or not. Logs of every command: ``--work``/logs. Self-check in about a
minute: ``python benchmarks/scale.py --shapes tiny --recipes gptq-w4-g64 --peer --samples 4 --seq-len 64``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from _common import provenance, split_list
from quantization import PEERS

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "scale_peer.py"
GENERATOR_VERSION = 1  # bump when the written checkpoints change: cached ones are then written again
GB = 1e9

# Real configs (hub config.json of meta-llama/Llama-3.1-8B, Llama-3.2-3B, Llama-3.2-1B); tiny: a quick self-check
_LLAMA3 = {"vocab": 128256, "rope_theta": 500000.0, "max_positions": 131072, "bos": 128000, "eos": 128001}
SHAPES = {
    "8b": {**_LLAMA3, "layers": 32, "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8,
           "head_dim": 128, "tied": False, "rope_factor": 8.0, "shards": 4, "real": "Llama-3.1-8B"},
    "3b": {**_LLAMA3, "layers": 28, "hidden": 3072, "intermediate": 8192, "heads": 24, "kv_heads": 8,
           "head_dim": 128, "tied": True, "rope_factor": 32.0, "shards": 2, "real": "Llama-3.2-3B"},
    "1b": {**_LLAMA3, "layers": 16, "hidden": 2048, "intermediate": 8192, "heads": 32, "kv_heads": 8,
           "head_dim": 64, "tied": True, "rope_factor": 32.0, "shards": 1, "real": "Llama-3.2-1B"},
    "tiny": {**_LLAMA3, "layers": 4, "hidden": 256, "intermediate": 768, "heads": 4, "kv_heads": 2,
             "head_dim": 64, "tied": False, "rope_factor": 8.0, "shards": 2, "real": "8B-like, 4 layers"},
}
DEFAULT_JOBS = [("8b", "rtn-w4-g64"), ("1b", "gptq-w4-g64")]
STD = 0.02  # the value std of every matrix (LlamaConfig's initializer_range); norm weights are ones
CHUNK = 1 << 24  # values generated and written at a time (64 MB in float32)


# ---------------------------------------------------------------------------------------------------- checkpoints

def llama_config(shape: dict):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], hidden_act="silu",
        max_position_embeddings=shape["max_positions"], rms_norm_eps=1e-5, rope_theta=shape["rope_theta"],
        rope_scaling={"rope_type": "llama3", "factor": shape["rope_factor"], "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        attention_bias=False, mlp_bias=False, initializer_range=STD, tie_word_embeddings=shape["tied"],
        bos_token_id=shape["bos"], eos_token_id=shape["eos"], dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    return config


def parameter_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, in the model's order, from a model on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    names = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    if config.tie_word_embeddings:  # a tied head is not stored (save_pretrained drops it)
        names = [(n, s) for n, s in names if n != "lm_head.weight"]
    return names


def _write_tensor(f, name: str, shape: tuple[int, ...], seed: int) -> None:
    """Random normal (std STD) bfloat16 values, or ones for a norm's weight, in row chunks; seeded per tensor."""
    if len(shape) == 1:
        f.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
        return
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    rows, cols = shape
    step = max(1, CHUNK // cols)
    for start in range(0, rows, step):
        chunk = torch.randn((min(step, rows - start), cols), generator=gen).mul_(STD).to(torch.bfloat16)
        f.write(chunk.view(torch.int16).numpy().tobytes())


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """One safetensors file written tensor by tensor: the header (computed from the shapes), then the bytes."""
    header, offset = {}, 0
    for name, shape in tensors:
        size = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in tensors:
            _write_tensor(f, name, shape, seed)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tokenizer_folder() -> Path:
    from llmpress.models.smollm2 import ensure_smollm2

    return Path(ensure_smollm2())


def checkpoint(name: str, work: Path, seed: int, log=print) -> Path:
    """The folder of shape ``name`` under ``work``: reused when its marker (written last) matches, else written."""
    shape = SHAPES[name]
    folder = work / "checkpoints" / f"llama-{name}"
    marker = folder / "scale-checkpoint.json"
    want = {"shape": shape, "seed": seed, "std": STD, "generator": GENERATOR_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    config = llama_config(shape)
    tensors = parameter_shapes(config)
    total = sum(2 * _numel(s) for _, s in tensors)
    log(f"writing the {name} checkpoint ({shape['real']}, {total / GB:.2f} GB bfloat16) to {folder}")
    n = shape["shards"]
    files: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(n)]
    done = 0
    for tensor in tensors:  # in the model's order, cut into shards of about equal bytes
        files[min(n - 1, done * n // total)].append(tensor)
        done += 2 * _numel(tensor[1])
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file, part in zip(names, files):
        write_safetensors(folder / file, part, seed)
    if n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t: file for file, part in zip(names, files) for t, _ in part}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    source = tokenizer_folder()
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / file, folder / file)
    marker.write_text(json.dumps(want))
    log(f"  written in {time.perf_counter() - start:.0f}s")
    return folder


# ---------------------------------------------------------------------------------------------------- measuring

def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, ... (from /proc/PID/task/*/children), best effort."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


TIME = "/usr/bin/time"


def measure(cmd: list[str], log_file: Path, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run ``cmd`` (stdout and stderr to ``log_file``): {"ok", "rc", "seconds", "peak_rss_bytes",
    "peak_anon_bytes", "rss_from", "tail", "error"}.

    Peak RSS is the kernel's high-water mark (ru_maxrss) of the command and its waited-for children, as GNU
    time reports it (``/usr/bin/time -f %M``). The command is started by ``time``, not forked from this
    Python: a child forked (or vforked) from a process and then exec'd keeps the parent's high-water mark in
    its ru_maxrss, so a fork from this ~0.4 GB process would never report less than that. Without
    ``/usr/bin/time`` the peak is VmHWM sampled from /proc every 0.2 s (a peak in the last 0.2 s is missed).
    Peak anon is sampled the same way (RssAnon summed over the process tree: memory not backed by a file,
    i.e. without the pages of memory-mapped checkpoints)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    rss_file = log_file.with_suffix(".maxrss")
    rss_file.unlink(missing_ok=True)
    timed = Path(TIME).exists()
    full = [TIME, "-f", "%M", "-o", str(rss_file), *cmd] if timed else cmd
    anon, hwm = [0], [0]
    with open(log_file, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        done = threading.Event()

        def sample():
            while not done.wait(0.2):
                pids = _descendants(proc.pid) if timed else [proc.pid, *_descendants(proc.pid)]
                anon[0] = max(anon[0], sum(_status_kb(p, "RssAnon") or 0 for p in pids))
                hwm[0] = max([hwm[0], *(_status_kb(p, "VmHWM") or 0 for p in pids)])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL)) if timeout else None
        if timer:
            timer.start()
        try:
            rc = proc.wait()
        except BaseException:  # Ctrl-C: the command goes with us
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            done.set()
            if timer:
                timer.cancel()
        seconds = time.perf_counter() - start
    peak, rss_from = hwm[0] * 1024 or None, "VmHWM sampled"
    if timed:
        try:  # time writes "Command exited with non-zero status N" / "... terminated by signal N" first
            peak, rss_from = int(rss_file.read_text().split()[-1]) * 1024, "ru_maxrss"
        except (OSError, ValueError, IndexError):
            pass
    lines = [line for line in log_file.read_text(errors="replace").splitlines()[1:] if line.strip()]
    ok = rc == 0
    return {"ok": ok, "rc": rc, "seconds": seconds, "peak_rss_bytes": peak, "peak_anon_bytes": anon[0] * 1024 or None,
            "rss_from": rss_from, "tail": None if ok else "\n".join(lines[-15:]),
            "error": None if ok else _reason(lines, rc, rss_file)}


def _reason(lines: list[str], rc: int, rss_file: Path) -> str:
    """One line for a failed command: killed by which signal, else its last line (llmpress's "error: ..." line,
    a traceback's exception)."""
    killed = rss_file.exists() and "terminated by signal" in rss_file.read_text()
    if rc < 0 or killed:
        sig = -rc if rc < 0 else rc - 128
        return f"killed by signal {sig}" + (" (out of memory or --timeout?)" if sig == signal.SIGKILL else "")
    return (lines or [f"exit {rc}"])[-1].strip()[:160]


def _folder_bytes(folder: Path) -> int | None:
    if not folder.is_dir():
        return folder.stat().st_size if folder.is_file() else None
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _find(data, key: str):
    """``data[key]`` at the top level or in a nested mapping (the plan's JSON layout is not fixed yet)."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------------------------------------------- the runs

class Scale:
    def __init__(self, args) -> None:
        self.args = args
        self.work = Path(args.work).expanduser().resolve()
        self.llmpress = [args.llmpress or str(Path(sys.executable).parent / "llmpress")]
        if not Path(self.llmpress[0]).exists():
            self.llmpress = [sys.executable, "-m", "llmpress.cli"]
        self.plan_help = self._plan_help()
        self.commands: list[str] = []

    def log(self, message: str) -> None:
        if not self.args.quiet:
            print(message, file=sys.stderr, flush=True)

    def _plan_help(self) -> str | None:
        """``llmpress plan --help``'s text, or None when the command does not exist (yet)."""
        proc = subprocess.run([*self.llmpress, "plan", "--help"], capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else None

    def _run(self, cmd: list[str], log_name: str, env: dict | None = None) -> dict:
        self.commands.append(" ".join(cmd))
        self.log("$ " + " ".join(cmd))
        result = measure(cmd, self.work / "logs" / f"{log_name}.log", env=env, timeout=self.args.timeout or None)
        self.log(f"  {'ok' if result['ok'] else 'FAILED: ' + result['error']}: {result['seconds']:.1f}s, "
                 f"peak RSS {_g(result['peak_rss_bytes'])} GB")
        return result

    def _calibration(self, recipe: str) -> list[str]:
        """The calibration flags of ``recipe``'s command (none for recipes without calibration, e.g. RTN)."""
        if not _needs_calibration(recipe):
            return []
        seed = ["--seed", str(self.args.seed)] if self.args.seed else []
        return ["--samples", str(self.args.samples), "--seq-len", str(self.args.seq_len), *seed]

    def windows(self, folder: Path, recipe: str) -> torch.Tensor | None:
        """The calibration token ids llmpress calibrates ``recipe`` on (None when it does not calibrate).

        Computing them (and the evaluation windows) here, before any command is timed, fills llmpress's token
        cache for this folder's tokenizer: neither toolkit's time then includes tokenizing the corpus (the peer
        is given the ids)."""
        from llmpress.data import calibration_samples
        from llmpress.recipe import load_recipe

        tokenizer = self.warm_eval(folder)
        if not _needs_calibration(recipe):
            return None
        calib = load_recipe(recipe).calibration
        return calibration_samples(tokenizer, calib.data, self.args.samples, self.args.seq_len, seed=self.args.seed)

    def warm_eval(self, folder: Path):
        """The folder's tokenizer, after tokenizing the evaluation text with it (llmpress caches the ids per
        tokenizer and folder), so that the timed eval does not include it."""
        from transformers import AutoTokenizer

        from llmpress.data import eval_windows

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        eval_windows(tokenizer, "austen:eval", self.args.eval_seq_len, self.args.eval_windows)
        return tokenizer

    def plan(self, folder: Path, recipe: str, tag: str, out: Path) -> dict | None:
        """``llmpress plan``'s prediction for the compress command that follows (None without the command)."""
        if self.plan_help is None:
            return None
        file = self.work / "logs" / f"{tag}-plan.json"
        file.unlink(missing_ok=True)
        extra = self._calibration(recipe) if "--samples" in self.plan_help else []
        extra += ["--out", str(out)] if "--out" in self.plan_help else []
        run = self._run([*self.llmpress, "plan", str(folder), "--recipe", recipe, *extra, "--json", str(file)],
                        f"{tag}-plan")
        predicted = json.loads(file.read_text()) if run["ok"] and file.exists() else {}
        return {"run": run, "error": run["error"], "json": predicted,
                **{k: _find(predicted, k) for k in ("peak_ram_bytes", "disk_bytes", "seconds")}}

    def llmpress_row(self, shape: str, folder: Path, recipe: str) -> dict:
        tag = f"{shape}-llmpress-{recipe}"
        out = self.work / "out" / tag
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        row = {"shape": shape, "toolkit": "llmpress", "recipe": recipe, "plan": self.plan(folder, recipe, tag, out)}
        row["compress"] = self._run([*self.llmpress, "compress", str(folder), "--recipe", recipe, "--out", str(out),
                                     *self._calibration(recipe)], f"{tag}-compress")
        if row["compress"]["ok"]:
            row["out_bytes"] = _folder_bytes(out)
            row["job"] = _llmpress_job(out)
            self.warm_eval(out)
            ev_json = self.work / "logs" / f"{tag}-eval.json"
            ev_json.unlink(missing_ok=True)
            row["eval"] = self._run([*self.llmpress, "eval", str(out), "--max-windows", str(self.args.eval_windows),
                                     "--seq-len", str(self.args.eval_seq_len), "--no-speed", "--json", str(ev_json)],
                                    f"{tag}-eval")
            if row["eval"]["ok"] and ev_json.exists():
                row["perplexity"] = _find(json.loads(ev_json.read_text()), "perplexity")
        if not self.args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
        return row

    def peer_row(self, shape: str, folder: Path, recipe: str) -> dict:
        tag = f"{shape}-llm-compressor-{recipe}"
        row = {"shape": shape, "toolkit": "llm-compressor", "recipe": recipe}
        ids = self.windows(folder, recipe)
        run_dir = self.work / "peer" / tag
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        windows, spec, result, out = (run_dir / "windows.safetensors", run_dir / "spec.json",
                                      run_dir / "result.json", run_dir / "model")
        save_file({"calib": ids.contiguous()}, str(windows))  # tensors only: nothing the peer loads can run code
        spec.write_text(json.dumps({**PEERS[recipe], "dtype": "auto"}))
        env = {**os.environ, "TQDM_DISABLE": "1"}
        row["compress"] = self._run([self.args.peer_python, str(PEER_SCRIPT), str(folder), str(windows), str(spec),
                                     str(result), str(out)], f"{tag}-compress", env=env)
        peer = json.loads(result.read_text()) if result.exists() else {}
        row["peer"] = peer
        if peer.get("error") and row["compress"]["ok"]:  # the script caught it and exited 0
            row["compress"].update(ok=False, error=peer["error"])
        if row["compress"]["ok"]:
            row["out_bytes"] = _folder_bytes(out)
            row["job"] = {"layers": [n for n in peer.get("quantized") or []],
                          "grids": [_peer_grid(w) for w in peer.get("weights") or []]}
        if not self.args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
        return row

    def run(self, jobs: list[tuple[str, str]], peer_shapes: set[str], saved=lambda rows: None) -> list[dict]:
        """The rows of ``jobs``; ``saved(rows)`` is called after each one (the JSON is written as it goes)."""
        rows: list[dict] = []
        for shape in dict.fromkeys(s for s, _ in jobs):
            folder = checkpoint(shape, self.work, self.args.weights_seed, self.log)
            for s, recipe in jobs:
                if s != shape:
                    continue
                self.windows(folder, recipe)  # tokenizes the texts before anything is timed
                ours = None
                if "llmpress" in self.args.sides:
                    ours = self.llmpress_row(shape, folder, recipe)
                    rows.append(ours)
                    saved(rows)
                if "peer" in self.args.sides and shape in peer_shapes and recipe in PEERS:
                    theirs = self.peer_row(shape, folder, recipe)
                    theirs["same_job"] = same_job((ours or {}).get("job"), theirs.get("job"))
                    rows.append(theirs)
                    saved(rows)
        return rows


def merge_rows(rows: list[dict], earlier: list[dict], source: str) -> list[dict]:
    """``rows`` and the rows of an earlier run (``--rows``) for the shape/recipe/toolkit this run did not measure,
    each marked with the file it came from; the peer's same-job check is redone against this run's llmpress row."""
    have = {(r["shape"], r["recipe"], r["toolkit"]) for r in rows}
    merged = list(rows)
    for r in earlier:
        if (r["shape"], r["recipe"], r["toolkit"]) not in have:
            merged.append({**r, "from": source})
    for r in merged:
        if r["toolkit"] == "llm-compressor":
            ours = next((o for o in merged if o["toolkit"] == "llmpress" and o["shape"] == r["shape"]
                         and o["recipe"] == r["recipe"]), None)
            r["same_job"] = same_job((ours or {}).get("job"), r.get("job"))
    order = {(r["shape"], r["recipe"]): i for i, r in enumerate(merged)}
    return sorted(merged, key=lambda r: (order[(r["shape"], r["recipe"])], r["toolkit"] != "llmpress"))


def _needs_calibration(recipe: str) -> bool:
    """Whether ``recipe`` calibrates; False for a name llmpress does not know (its command then says why)."""
    from llmpress.recipe import load_recipe

    try:
        return load_recipe(recipe).needs_calibration
    except Exception:
        return False


def _llmpress_job(out: Path) -> dict | None:
    """The layers llmpress rewrote and their grids (bits, group, symmetric), from the folder's llmpress.json."""
    meta_file = out / "llmpress.json"
    if not meta_file.exists():
        return None
    layers = json.loads(meta_file.read_text()).get("layers") or {}
    grids = {json.dumps([m.get("bits"), m.get("group_size"), m.get("sym")]) for m in layers.values()}
    return {"layers": sorted(layers), "grids": [json.loads(g) for g in sorted(grids)]}


def _peer_grid(weights: dict) -> list:
    group = weights.get("group_size") if weights.get("strategy") == "group" else -1
    return [weights.get("num_bits"), group, weights.get("symmetric")]


def same_job(ours: dict | None, theirs: dict | None) -> str:
    """"yes" when both toolkits rewrote the same linears on the same grid, else what differs."""
    if not ours or not theirs:
        return "–"
    a, b = set(ours["layers"]), set(theirs["layers"])
    if a != b:
        return (f"no: only llm-compressor {sorted(b - a)[:2]} ({len(b - a)}), "
                f"only llmpress {sorted(a - b)[:2]} ({len(a - b)})")
    if ours["grids"] != theirs["grids"]:
        return f"no: grids (bits, group, sym) {ours['grids']} vs {theirs['grids']}"
    return f"yes ({len(a)} linears, grid {ours['grids'][0] if len(ours['grids']) == 1 else ours['grids']})"


# ---------------------------------------------------------------------------------------------------- output

def _g(value, scale: float = GB, digits: int = 2) -> str:
    return "–" if value is None else f"{value / scale:,.{digits}f}"


def _rss(run: dict) -> str:
    """Peak RSS, and in parentheses the sampled peak of its anonymous part (without mapped file pages)."""
    return f"{_g(run['peak_rss_bytes'])} ({_g(run.get('peak_anon_bytes'))})"


def table(rows: list[dict]) -> str:
    head = ["shape", "toolkit", "recipe", "peak RSS GB (anon)", "wall s", "out GB", "eval peak RSS GB (anon)",
            "eval s", "ppl", "plan RAM GB", "plan disk GB", "plan s", "same job"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 4) + ["---"]) + "|"]
    for r in rows:
        c, ev, plan = r["compress"], r.get("eval") or {}, r.get("plan") or {}
        if c["ok"]:
            main = [_rss(c), _g(c["seconds"], 1, 1), _g(r.get("out_bytes"))]
        else:
            main = [f"failed: {c['error'][:100]}", _g(c["seconds"], 1, 1), "–"]
        if ev and not ev["ok"]:
            evc = [f"failed: {ev['error'][:100]}", _g(ev["seconds"], 1, 1), "–"]
        else:
            evc = [_rss(ev) if ev else "–", _g(ev.get("seconds"), 1, 1), _g(r.get("perplexity"), 1, 1)]
        if plan.get("error"):
            planc = [f"failed: {plan['error'][:60]}", "–", "–"]
        else:
            planc = [_g(plan.get("peak_ram_bytes")), _g(plan.get("disk_bytes")), _g(plan.get("seconds"), 1, 1)]
        toolkit = r["toolkit"] + (" (earlier run, --rows)" if r.get("from") else "")
        lines.append("| " + " | ".join([r["shape"], toolkit, r["recipe"], *main, *evc, *planc,
                                        r.get("same_job", "")]) + " |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """Issue 14's acceptance, for the rows that measure it."""
    out = []
    for r in rows:
        if r["toolkit"] != "llmpress":
            continue
        c, ev = r["compress"], r.get("eval")
        if r["shape"] == "8b" and r["recipe"] == "rtn-w4-g64":
            met = c["ok"] and c["peak_rss_bytes"] is not None and c["peak_rss_bytes"] <= 4e9
            out.append(f"- 8b rtn-w4-g64 compress completes with peak RSS <= 4 GB: {'yes' if met else 'NO'} "
                       f"({'ok' if c['ok'] else 'failed'}, {_g(c['peak_rss_bytes'])} GB)")
            out.append(f"- 8b eval of the result completes: {'yes' if ev and ev['ok'] else 'NO'}"
                       + (f" ({_g(ev['peak_rss_bytes'])} GB, {ev['seconds']:.0f}s)" if ev else ""))
        peer = next((p for p in rows if p["toolkit"] == "llm-compressor" and p["shape"] == r["shape"]
                     and p["recipe"] == r["recipe"]), None)
        if peer is None:
            continue
        pc = peer["compress"]
        if not (c["ok"] and pc["ok"] and c["peak_rss_bytes"] and pc["peak_rss_bytes"]):
            out.append(f"- {r['shape']} {r['recipe']} vs llm-compressor: not comparable "
                       f"(llmpress {'ok' if c['ok'] else 'failed'}, llm-compressor {'ok' if pc['ok'] else 'failed'})")
            continue
        rss, sec = c["peak_rss_bytes"] / pc["peak_rss_bytes"], c["seconds"] / pc["seconds"]
        out.append(f"- {r['shape']} {r['recipe']}: llmpress peak RSS <= 1/2 of llm-compressor's: "
                   f"{'yes' if rss <= 0.5 else 'NO'} ({rss:.2f}x); wall time <= 1/2: {'yes' if sec <= 0.5 else 'NO'} "
                   f"({sec:.2f}x); same job: {peer.get('same_job')}")
    return out


def default_peer_python() -> str | None:
    for candidate in ("/tmp/lc-venv/bin/python", sys.executable):
        probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('llmcompressor') is None)"
        if Path(candidate).exists() and subprocess.run([candidate, "-c", probe], capture_output=True).returncode == 0:
            return candidate
    return None


def _mem_total() -> int | None:
    kb = _status_kb_meminfo("MemTotal")
    return None if kb is None else kb * 1024


def _status_kb_meminfo(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def checkpoint_bytes(name: str) -> int:
    s = SHAPES[name]
    layer = (2 * s["hidden"] * s["heads"] * s["head_dim"] + 2 * s["hidden"] * s["kv_heads"] * s["head_dim"]
             + 3 * s["hidden"] * s["intermediate"] + 2 * s["hidden"])
    return 2 * (s["layers"] * layer + (1 if s["tied"] else 2) * s["vocab"] * s["hidden"] + s["hidden"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", help=f"comma-separated, of {', '.join(SHAPES)} (default: the issue's jobs, "
                                    f"{', '.join(f'{s} {r}' for s, r in DEFAULT_JOBS)})")
    p.add_argument("--recipes", help="comma-separated recipe names: every shape runs every one")
    p.add_argument("--peer", dest="peer", action="store_true", default=None,
                   help="run llm-compressor beside every recipe it has a mapping for, on every shape")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="never run llm-compressor")
    p.add_argument("--peer-python", default="auto", help="a Python with llmcompressor (auto: /tmp/lc-venv, then this)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (recipes that calibrate)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length")
    p.add_argument("--seed", type=int, default=0, help="calibration seed")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random checkpoints")
    p.add_argument("--eval-windows", type=int, default=2)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--work", default="~/.cache/llmpress/scale-bench",
                   help="checkpoints (reused by later runs), outputs and logs")
    p.add_argument("--keep-outputs", action="store_true", help="keep the compressed folders (default: removed)")
    p.add_argument("--llmpress", help="the llmpress executable to measure (default: the one beside this Python)")
    p.add_argument("--timeout", type=float, default=0, help="seconds per command, 0 = none")
    p.add_argument("--json", help="also write the rows as JSON to this file (rewritten after each row)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--sides", default="llmpress,peer",
                   help="which toolkits this run measures: llmpress, peer or both (default); with --rows, a side "
                        "measured in an earlier run joins the table, marked as such")
    p.add_argument("--rows", help="the --json file of an earlier run: its rows join this run's table where this run "
                                  "did not measure the same shape, recipe and toolkit")
    args = p.parse_args()
    args.sides = set(split_list(args.sides))
    if not args.sides or args.sides - {"llmpress", "peer"}:
        p.error("--sides takes llmpress, peer or both, comma-separated")

    shapes = split_list(args.shapes) if args.shapes else None
    unknown = [s for s in shapes or [] if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape {unknown[0]}: use {', '.join(SHAPES)}")
    if args.recipes:
        jobs = [(s, r) for s in shapes or [s for s, _ in DEFAULT_JOBS] for r in split_list(args.recipes)]
    else:
        jobs = [(s, r) for s, r in DEFAULT_JOBS if shapes is None or s in shapes]
        jobs += [(s, r) for s in shapes or [] if s not in {j for j, _ in DEFAULT_JOBS} for r in ["rtn-w4-g64"]]
    if args.peer_python == "auto":
        args.peer_python = None if args.peer is False else default_peer_python()
    memory = _mem_total()
    if args.peer is False or args.peer_python is None:
        peer_shapes = set()
    elif args.peer:
        peer_shapes = {s for s, _ in jobs}
    else:  # the peer holds the whole model: only where it fits in a third of the memory
        peer_shapes = {s for s, _ in jobs if memory is None or checkpoint_bytes(s) <= memory / 3}
    scale = Scale(args)
    for s in sorted({s for s, r in jobs if r in PEERS} - peer_shapes):
        scale.log(f"llm-compressor skipped on {s}" + (": --no-peer" if args.peer is False else
                  ": no Python with llmcompressor" if args.peer_python is None else
                  f": its whole-model load ({checkpoint_bytes(s) / GB:.1f} GB) exceeds a third of the memory; "
                  "--peer forces it"))
    if scale.plan_help is None:
        scale.log("no 'llmpress plan' command: the plan columns stay empty")
    shapes_used = {s: {**SHAPES[s], "bytes": checkpoint_bytes(s)} for s in dict.fromkeys(s for s, _ in jobs)}

    def save(rows: list[dict]) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "memory_bytes": memory},
                                                   "provenance": provenance(), "shapes": shapes_used,
                                                   "commands": scale.commands, "rows": rows}, indent=2))

    rows = scale.run(jobs, peer_shapes, save)
    if args.rows:
        rows = merge_rows(rows, json.loads(Path(args.rows).read_text())["rows"], args.rows)
        save(rows)

    print(f"{os.cpu_count()} CPUs, {_g(memory)} GB memory, torch threads {torch.get_num_threads()}; checkpoints "
          f"bfloat16 random (std {STD}) under {scale.work / 'checkpoints'}; calibration {args.samples}x{args.seq_len} "
          f"austen:calib seed {args.seed} (recipes that calibrate); eval {args.eval_windows}x{args.eval_seq_len} "
          "austen:eval (random weights: the perplexity only shows the model runs)")
    print()
    print(table(rows))
    checks = targets(rows)
    if checks:
        print()
        print("Issue 14 targets:")
        print("\n".join(checks))


if __name__ == "__main__":
    main()

"""GGUF sources streamed: peak memory and time of compressing a .gguf file block by block, against loading it whole.

A random-weight checkpoint of a real Llama shape (``benchmarks/scale.py``'s, bf16) is written as one GGUF file
with ``llmpress export`` (every 2-D tensor Q8_0, norms F32; plain rotary embeddings, as llmpress's GGUF writer
does not write Llama 3's rope scaling yet, which changes nothing measured here). Then
``llmpress compress FILE.gguf --recipe R`` runs streamed (``--stream on``: each tensor read at its offset and
dequantized when its block is reached) and whole (``--stream off``: transformers' GGUF loader dequantizes the
whole file to float32 first), each its own process, measured from outside (``scale.measure``: ru_maxrss, wall
time). The two outputs are compared tensor by tensor.

    python benchmarks/gguf_stream.py [--shape 1b] [--recipe rtn-w4-g64] [--work DIR] [--json FILE]

Prints a table: how the file was read, peak RSS (sampled anonymous peak), wall seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import GB, checkpoint, measure  # noqa: E402


def _tensors_equal(a: Path, b: Path) -> tuple[int, list[str]]:
    """(tensors compared, names that differ) between two output folders."""
    def read(folder: Path) -> dict[str, tuple[Path, str]]:
        found = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                found.update({k: (file, k) for k in f.keys()})
        return found

    left, right = read(a), read(b)
    differ = sorted(set(left) ^ set(right))
    for name in sorted(set(left) & set(right)):
        with safe_open(str(left[name][0]), framework="pt") as f, safe_open(str(right[name][0]), framework="pt") as g:
            if not torch.equal(f.get_tensor(name), g.get_tensor(name)):
                differ.append(name)
    return len(left), differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--recipe", default="rtn-w4-g64")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "llmpress" / "scale-bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    exe = str(Path(sys.executable).with_name("llmpress"))
    folder = checkpoint(args.shape, args.work, seed=0)
    gguf = args.work / "checkpoints" / f"llama-{args.shape}-q8_0.gguf"
    runs = args.work / "gguf-runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    if not gguf.is_file():
        plain = args.work / "checkpoints" / f"llama-{args.shape}-plain-rope"  # the shards linked, the config edited
        shutil.rmtree(plain, ignore_errors=True)
        plain.mkdir()
        for file in folder.iterdir():
            if file.name != "config.json":
                (plain / file.name).symlink_to(file)
        config = json.loads((folder / "config.json").read_text())
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
        (plain / "config.json").write_text(json.dumps(config, indent=2))
        made = measure([exe, "export", str(plain), "--out", str(gguf), "--dense-type", "Q8_0",
                        "--embedding-type", "Q8_0"], runs / "export.log")
        if not made["ok"]:
            raise SystemExit(f"export failed: {made['tail']}")
        print(f"wrote {gguf} ({gguf.stat().st_size / GB:.2f} GB) in {made['seconds']:.0f} s")
    rows = []
    for stream in ("on", "off"):
        out = runs / f"stream-{stream}"
        result = measure([exe, "compress", str(gguf), "--recipe", args.recipe, "--out", str(out), "--stream", stream,
                          "--quiet"], runs / f"stream-{stream}.log")
        rows.append({"stream": stream, **{k: result[k] for k in ("ok", "seconds", "peak_rss_bytes",
                                                                  "peak_anon_bytes", "rss_from", "error")}})
        print(f"--stream {stream}: ok={result['ok']} peak {result['peak_rss_bytes'] / GB:.2f} GB, "
              f"{result['seconds']:.0f} s", flush=True)
    compared, differ = _tensors_equal(runs / "stream-on", runs / "stream-off") if all(r["ok"] for r in rows) \
        else (0, ["(a run failed)"])
    print(f"\n{args.shape} shape as Q8_0 GGUF ({gguf.stat().st_size / GB:.2f} GB), `compress --recipe {args.recipe}`\n")
    print("| read | peak RSS GB (sampled anon) | wall s |\n|---|---:|---:|")
    for row in rows:
        how = "streamed (`--stream on`)" if row["stream"] == "on" else "whole (`--stream off`)"
        anon = row["peak_anon_bytes"]
        print(f"| {how} | {row['peak_rss_bytes'] / GB:.2f} ({'-' if anon is None else f'{anon / GB:.2f}'}) | "
              f"{row['seconds']:.0f} |")
    print(f"\n{compared} tensors compared, {len(differ)} differ{': ' + ', '.join(differ[:5]) if differ else ''}")
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "recipe": args.recipe, "gguf_bytes": gguf.stat().st_size,
                                         "rows": rows, "tensors_compared": compared, "differ": differ}, indent=2))


if __name__ == "__main__":
    main()

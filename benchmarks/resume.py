"""Kill a streamed compression with SIGKILL after block k, run the same command again, compare the bytes.

Issue 14's resume acceptance on the real default model: an uninterrupted run, then the same command killed
from outside (SIGKILL, when ``.OUT.partial/progress.json`` says block k is written), then the same command
again, which resumes at block k + 1. Every file of the two output folders is compared byte for byte;
``llmpress.json`` differs only in its timing entries (compress time, peak memory) and the note that the run
was resumed, and its layer and block records are compared instead.

    python benchmarks/resume.py [--model smollm2-135m] [--recipe gptq-w4-g64] [--kill-after 12]
                                [--samples 128 --seq-len 512] [--work DIR]

Prints a table: run, wall seconds, blocks done, and the comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def compress(args, out: Path, kill_after: int | None = None) -> tuple[float, int]:
    """Run ``llmpress compress`` to ``out``; with ``kill_after``, SIGKILL it once that many blocks are written.
    Returns (seconds, exit code)."""
    exe = Path(sys.executable).with_name("llmpress")
    cmd = [str(exe), "compress", args.model, "--recipe", args.recipe, "--out", str(out), "--quiet",
           "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--stream", "on"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    progress = out.parent / f".{out.name}.partial" / "progress.json"
    while proc.poll() is None:
        if kill_after is not None and progress.is_file():
            try:
                done = json.loads(progress.read_text())["done"]
            except (ValueError, KeyError, OSError):
                done = 0
            if done >= kill_after:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait()
    err = proc.stderr.read()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"compress failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    return time.perf_counter() - start, proc.returncode


def compare(a: Path, b: Path) -> list[str]:
    """Files that differ (llmpress.json by its records), or are missing on one side."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    differ = []
    for name in names:
        if not (a / name).is_file() or not (b / name).is_file():
            differ.append(f"{name} (missing)")
        elif name == "llmpress.json":
            ma, mb = (json.loads((f / name).read_text()) for f in (a, b))
            if ma["layers"] != mb["layers"] or ma["blocks"] != mb["blocks"] or ma["recipe"] != mb["recipe"]:
                differ.append(name)
        elif (a / name).read_bytes() != (b / name).read_bytes():
            differ.append(name)
    return differ


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="gptq-w4-g64")
    p.add_argument("--kill-after", type=int, default=12, help="SIGKILL once this many blocks are written")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--work", help="folder for the outputs (default: a temporary one, removed)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="llmpress-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        full_s, _ = compress(args, work / "full")
        killed_s, code = compress(args, work / "resumed", kill_after=args.kill_after)
        progress = json.loads((work / ".resumed.partial" / "progress.json").read_text())
        resumed_s, _ = compress(args, work / "resumed")
        differ = compare(work / "full", work / "resumed")
        files = len(list((work / "full").iterdir()))
        print(f"{args.recipe} on {args.model}, calibration {args.samples}x{args.seq_len}\n")
        print("| run | wall s | blocks written |")
        print("|---|---:|---|")
        print(f"| uninterrupted | {full_s:.1f} | all |")
        print(f"| killed (SIGKILL, exit {code}) | {killed_s:.1f} | {progress['done']} |")
        print(f"| same command again | {resumed_s:.1f} | the rest, from block {progress['done']} |")
        print(f"\n{files} files compared: " + ("all identical (llmpress.json: same records)" if not differ
                                              else f"DIFFER: {', '.join(differ)}"))
        if differ:
            raise SystemExit(1)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

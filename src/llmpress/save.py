"""Write a folder without ever leaving a half-written one: the writer every storage format uses.

Everything goes to a hidden temporary folder beside the target
(``.NAME.tmp-PID-XXXX``), which is renamed into place only when complete; an
existing target is never touched. A run killed while saving (SIGKILL, power
loss) leaves that folder behind: the next run with the same ``--out`` finds
it, says so in one log line and removes it, when the process named in it is
gone. The folder is what ``model.save_pretrained`` writes plus ``llmpress.json``
(recipe, per-layer metadata, notes, the tools that read the folder) that
``llmpress eval`` reads for size accounting. Files get ordinary permissions
(0644 under the usual umask).

This module chooses no format: :func:`save_model` writes the model exactly as it is
(its config, its modules' state dict). Which format holds a compressed model, and what
goes into ``config.json`` and ``llmpress.json`` for it, is the table in
``llmpress.export.formats`` (``formats.save``), whose entries all write through here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import LlmpressError
from .paths import make_public, process_alive

log = logging.getLogger(__name__)

META_FILE = "llmpress.json"


def check_new_path(value: str | Path, flag: str, what: str | None = None) -> Path:
    """``value`` as a path that does not exist yet, in an existing folder we can write to.

    One rule for every output (--out, --json, --report): the parent folder must exist (we never create
    folders the user did not ask for), and a probe file must be creatable in it, so a read-only mount,
    /proc or a missing permission fails before any work.
    """
    path, what = Path(value).expanduser(), what or flag
    if path.exists() or path.is_symlink():
        raise LlmpressError(f"{what} {path} already exists: choose a new {flag} path or remove it yourself")
    parent = path.parent
    if not parent.exists():
        raise LlmpressError(f"cannot write {what} {path}: folder {parent} does not exist; create it first "
                            f"(mkdir -p {parent}) or choose another {flag} path")
    if not parent.is_dir():
        raise LlmpressError(f"cannot write {what} {path}: {parent} is not a folder; choose another {flag} path")
    _probe(parent, f"{what} {path}", flag)
    return path


def _probe(folder: Path, what: str, flag: str) -> None:
    """Write and remove a file in ``folder``: os.access alone says yes to root on a read-only mount or /proc."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LlmpressError(f"cannot write {what}: folder {folder} is not writable; choose another {flag} path")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".llmpress-probe-")
    except OSError as exc:
        raise LlmpressError(f"cannot write {what}: {exc.strerror or exc} in {folder}; choose another {flag} "
                            "path") from exc
    os.close(fd)
    os.unlink(probe)


def check_output(out: str | Path) -> Path:
    """Fail early, before any work, unless ``out`` is new and its (existing) parent folder is writable.

    Also removes what a killed earlier run with the same ``out`` left behind (see :func:`remove_stale`).
    """
    path = check_new_path(out, "--out", "output folder")
    remove_stale(path)
    return path


def check_space(out: str | Path, needed: int) -> None:
    """Refuse to start when the disk of ``out`` has less than ``needed`` bytes free (a rough estimate)."""
    path = Path(out).expanduser()
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise LlmpressError(f"not enough disk space for {path}: about {needed / 1e6:,.0f} MB needed (the model's "
                            f"parameter bytes), {free / 1e6:,.0f} MB free on that disk; free some space or choose "
                            "another --out")


def _tmp_pattern(path: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(path.name)}\.tmp-(\d+)-[A-Za-z0-9_]+")


def stale_temporaries(path: Path) -> list[Path]:
    """Our temporary folders for ``path`` (``.NAME.tmp-PID-XXXX`` beside it) whose process is gone."""
    pattern = _tmp_pattern(path)
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if (m := pattern.fullmatch(p.name)) and p.is_dir() and not p.is_symlink()
                  and int(m.group(1)) != os.getpid() and not process_alive(int(m.group(1))))


def remove_stale(path: Path) -> None:
    """Remove the temporary folders a killed run saving to ``path`` left behind, saying so in one log line."""
    stale = stale_temporaries(path)
    if not stale:
        return
    size = sum(f.stat().st_size for p in stale for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    log.warning("removing %d unfinished temporary folder(s) left by an interrupted run (%s, %.0f MB)",
                len(stale), ", ".join(p.name for p in stale), size / 1e6)
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)


def save_model(model, tokenizer, out: str | Path, meta: dict,
               finish: Callable[[Path], None] | None = None) -> Path:
    """Save model, tokenizer and ``meta`` (as ``llmpress.json``) to ``out`` via a temporary folder and an
    atomic rename; the model is written as it is (``save_pretrained``), with no format of its own.

    ``finish(folder)`` runs on the temporary folder right after the model is written (an exporter's last
    touches: renamed weight files, config entries). ``meta["readers"]`` (the tools that read the folder)
    is the caller's to give: ``llmpress.export.formats`` fills it in for the format it wrote.
    """
    path = check_output(out)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
    try:
        model.save_pretrained(tmp)
        if finish is not None:
            finish(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        make_public(tmp)  # mkdtemp and safetensors make private files; the result is an ordinary folder
        if path.exists():  # appeared while we worked: never replace it
            raise LlmpressError(f"output folder {path} appeared while writing: choose a new --out path")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

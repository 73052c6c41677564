"""Resume points of model-level stages: what a stage computed at its natural points, kept on disk, so that the
same command run again after a kill skips it.

A streamed run resumes its block stages from its staging folder (``llmpress.stream``). A model-level stage works
on the whole model in memory, and a kill there lost everything it had computed: depth pruning's block scores
(ShortGPT's block influence: a forward pass of every calibration window; the greedy loss search: one pass per
candidate and round), low-rank's calibration Grams, spectra, rank allocation and factors (SVD-LLM: one
factorisation per linear, twice). ``llmpress.compress`` with an output path gives each such stage a
:class:`Resume` scoped to it, in a hidden folder ``.OUT.stages`` beside the output (:class:`StageFolder`),
stamped with the run's fingerprint (model files, recipe, calibration tokens, device, dtype, format). The same
command continues from what is there and writes the same bytes; another command is refused in one line; a
finished run deletes the folder.

Entries are JSON or safetensors files written atomically (a temporary file, then a rename): a kill never
leaves half an entry, and reading one runs no code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import LlmpressError
from .paths import process_alive

log = logging.getLogger(__name__)

RUN, LOCK = "run.json", "lock"


class Resume:
    """Named entries a stage keeps under ``folder/scope``; with ``folder`` None (no output path, a model given in
    memory) nothing is kept and nothing is found."""

    def __init__(self, folder: Path | None, scope: str = "") -> None:
        self.folder, self.scope = folder, scope

    def scoped(self, name: str) -> Resume:
        return Resume(self.folder, f"{self.scope}{name}/")

    def _path(self, key: str, suffix: str) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / f"{self.scope}{key}{suffix}"

    def _write(self, path: Path, write) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        write(tmp)
        os.replace(tmp, path)

    def json(self, key: str) -> Any | None:
        """Entry ``key`` as saved by :meth:`put_json`, or None."""
        path = self._path(key, ".json")
        if path is None or not path.is_file():
            return None
        log.info("resuming: %s read from %s", key, path)
        return json.loads(path.read_text())["value"]

    def put_json(self, key: str, value: Any) -> None:
        path = self._path(key, ".json")
        if path is not None:
            self._write(path, lambda tmp: tmp.write_text(json.dumps({"value": value})))

    def tensors(self, key: str) -> dict[str, torch.Tensor] | None:
        """Entry ``key`` as saved by :meth:`put_tensors`, or None."""
        from safetensors.torch import load_file

        path = self._path(key, ".safetensors")
        if path is None or not path.is_file():
            return None
        log.info("resuming: %s read from %s", key, path)
        return load_file(str(path))

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self._path(key, ".safetensors")
        if path is None:
            return
        seen: set[int] = set()
        own = {}
        for name, t in tensors.items():  # safetensors refuses tensors that share memory: those are copied
            t = t.detach().cpu().contiguous()
            own[name] = t.clone() if t.data_ptr() in seen and t.numel() else t
            seen.add(t.data_ptr())
        self._write(path, lambda tmp: save_file(own, str(tmp)))


NO_RESUME = Resume(None)


def refuse_if_busy(folder: Path, out: Path) -> None:
    """Refuse a staging folder beside ``out`` whose lock names another process that still runs."""
    lock = folder / LOCK
    pid = int(lock.read_text() or 0) if lock.is_file() else 0
    if pid and pid != os.getpid() and process_alive(pid):
        raise LlmpressError(f"another llmpress run (pid {pid}) is writing --out {out} now: wait for it "
                            "or choose another --out")


def refuse_if_other(folder: Path, out: Path, key: str, state: dict) -> None:
    """Refuse a staging folder a killed run of another command left (its ``state`` names another fingerprint)."""
    if state.get("fingerprint") != key:
        raise LlmpressError(f"--out {out} has an unfinished run of another command ({folder.name}: "
                            f"{state.get('what', 'unknown')}): repeat that command to resume it, or delete "
                            f"{folder} to start over")


class StageFolder:
    """The hidden folder ``.OUT.stages`` beside an output path, where a run's model-level stages keep their
    resume points (see the module docstring)."""

    def __init__(self, out: Path, key: str, what: str) -> None:
        self.out, self.key, self.what = out, key, what
        self.folder = out.parent / f".{out.name}.stages"
        self.resumed = False

    def open(self) -> Resume:
        """Take the folder over from a killed run of the same command, or create it; another command's is refused."""
        if self.folder.exists():
            refuse_if_busy(self.folder, self.out)
            if not self._holds_entries():  # killed before a stage kept anything: nothing to resume, start over
                shutil.rmtree(self.folder)
                return self.open()
            run = self.folder / RUN
            refuse_if_other(self.folder, self.out, self.key, json.loads(run.read_text()) if run.is_file() else {})
            log.warning("resuming the model-level stages of the unfinished run in %s", self.folder.name)
            self.resumed = True
        else:
            self.folder.mkdir()
            (self.folder / RUN).write_text(json.dumps({"fingerprint": self.key, "what": self.what}))
        (self.folder / LOCK).write_text(str(os.getpid()))
        return Resume(self.folder)

    def _holds_entries(self) -> bool:
        return any(p.name not in (RUN, LOCK) for p in self.folder.iterdir())

    def close(self, finished: bool, bad_input: bool = False) -> None:
        """Delete the folder when the run finished, when it kept nothing, or when this run (not a resumed one)
        stopped on bad input; else leave it, unlocked, for the same command."""
        if finished or not self._holds_entries() or (bad_input and not self.resumed):
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        (self.folder / LOCK).unlink(missing_ok=True)
        log.warning("the run stopped; the same command resumes its model-level stages from %s", self.folder)

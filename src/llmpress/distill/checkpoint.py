"""The distillation trainer's resume checkpoint: tensors in safetensors, everything else in JSON.

One file, ``last.safetensors``, written atomically (temporary file, then rename), so a kill
never leaves a half-written checkpoint and there is never more than the last one. Its tensors:
``param.<name>`` (the trainable parameters), ``optim.<name>.<key>`` (the optimizer's per-parameter
state, e.g. AdamW's ``exp_avg``, ``exp_avg_sq`` and ``step``) and ``rng.cpu`` / ``rng.cuda`` (the
RNG states, as uint8). Its header's metadata entry ``llmpress_checkpoint`` is JSON: the format
version, the training state (step, horizon, tokens, seconds, log), the TrainConfig, the data's
shape, and the optimizer's scalars (param groups with parameter names instead of indices, and
non-tensor per-parameter entries). Reading it runs no code: safetensors parses a JSON header
and copies bytes, unlike ``torch.load`` of a pickle, which can run anything the file names.

A pickle ``last.pt`` (the format before this one) is never opened: resuming from a folder that
has only that gives a one-line error saying why and what to do.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import LlmpressError
from .config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT = "last.safetensors"
LEGACY = "last.pt"  # pickle checkpoints of llmpress before 0.2: never loaded
VERSION = 2
META_KEY = "llmpress_checkpoint"
RESUME_KEYS = ("lr", "batch_size", "grad_accum", "seed", "steps", "warmup", "schedule", "weight_decay",
               "qat_lr_scale", "max_grad_norm")


def _tmp_files(folder: Path) -> list[Path]:
    return list(folder.glob(f".{CHECKPOINT}.tmp-*"))


def _param_order(optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter]) -> list[list[str]]:
    """Per param group, the names of its parameters in the optimizer's order (its state_dict indices)."""
    names = {id(p): n for n, p in named.items()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def save_checkpoint(folder: Path, named: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                    state: dict, cfg: TrainConfig, data: dict, device: torch.device) -> Path:
    """Write ``folder/last.safetensors`` atomically (see the module docstring); returns its path."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {f"param.{n}": p.detach().cpu().contiguous() for n, p in named.items()}
    order = _param_order(optimizer, named)
    flat = [n for group in order for n in group]
    saved = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, entries in saved["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{flat[index]}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(flat[index], {})[key] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names}
              for g, names in zip(saved["param_groups"], order)]
    tensors["rng.cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    header = {"version": VERSION, "state": state, "config": _config_dict(cfg), "data": data,
              "optimizer": {"param_groups": groups, "scalars": scalars}}
    for stale in _tmp_files(folder):  # left by a killed run: a checkpoint folder holds only the last one
        stale.unlink(missing_ok=True)
    tmp = folder / f".{CHECKPOINT}.tmp-{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", META_KEY: json.dumps(header)})
        os.replace(tmp, folder / CHECKPOINT)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return folder / CHECKPOINT


def _config_dict(cfg: TrainConfig) -> dict:
    return {f: getattr(cfg, f) for f in TrainConfig.__dataclass_fields__}


def remove_checkpoint(folder: Path) -> None:
    """Delete the checkpoint (and temporary files of killed saves); the folder too when that leaves it empty."""
    for path in [folder / CHECKPOINT, *_tmp_files(folder)]:
        path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # not empty (other files of the user's), or already gone
        pass


def _fail(path: Path, problem: str, fix: str = "delete it to train from the start, or use another "
                                              "checkpoint_dir") -> LlmpressError:
    return LlmpressError(f"checkpoint {path} {problem}: {fix}")


def _read(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """(JSON header, tensors) of a checkpoint file, or a one-line LlmpressError naming what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise _fail(path, f"is damaged or not a safetensors file ({reason})") from None
    if META_KEY not in metadata:
        raise _fail(path, "is not an llmpress distillation checkpoint (no llmpress_checkpoint entry)")
    try:
        header = json.loads(metadata[META_KEY])
    except ValueError:
        raise _fail(path, "has a damaged header (llmpress_checkpoint is not JSON)") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        version = header.get("version") if isinstance(header, dict) else None
        raise _fail(path, f"has format version {version!r}, not {VERSION}")
    return header, tensors


def _check_run(path: Path, header: dict, cfg: TrainConfig, data: dict) -> None:
    saved = header.get("config")
    if not isinstance(saved, dict) or not isinstance(header.get("data"), dict):
        raise _fail(path, "lacks its config or data entries")
    changed = [k for k in RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
    if changed:
        raise _fail(path, f"was written with a different {changed[0]} ({saved.get(changed[0])!r}, now "
                          f"{getattr(cfg, changed[0])!r})",
                          "resume with the same settings, or use a new checkpoint folder")
    if header["data"] != data:
        raise _fail(path, f"was written for other training data ({header['data']}, now {data})",
                    "resume with the same data, samples and seq_len, or use a new checkpoint folder")


def _restore_params(path: Path, tensors: dict[str, Tensor], named: dict[str, nn.Parameter]) -> None:
    saved = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    if set(saved) != set(named):
        extra = sorted(set(saved) ^ set(named))
        raise _fail(path, f"trains other parameters than this student (e.g. {extra[0]})",
                    "use the same trainable choice, or a new checkpoint folder")
    for name, p in named.items():
        if saved[name].shape != p.shape or saved[name].dtype != p.dtype:
            raise _fail(path, f"holds {name} as {saved[name].dtype} {tuple(saved[name].shape)}, the student has "
                              f"{p.dtype} {tuple(p.shape)}",
                              "use the same model and recipe, or a new checkpoint folder")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(saved[name])


def _optimizer_state(path: Path, header: dict, tensors: dict[str, Tensor], optimizer: torch.optim.Optimizer,
                     named: dict[str, nn.Parameter]) -> dict:
    """The optimizer's ``state_dict`` rebuilt from names, for this optimizer's parameter indices."""
    order = _param_order(optimizer, named)
    saved = header["optimizer"]
    if [g.get("params") for g in saved["param_groups"]] != order:
        raise _fail(path, "groups the optimizer's parameters differently",
                    "use the same trainable choice and recipe, or a new checkpoint folder")
    flat = [n for group in order for n in group]
    state: dict[int, dict] = {}
    for index, name in enumerate(flat):
        entries = {k.removeprefix(f"optim.{name}."): v for k, v in tensors.items() if k.startswith(f"optim.{name}.")}
        entries.update(saved["scalars"].get(name, {}))
        shape = named[name].shape
        if any(isinstance(v, Tensor) and v.dim() and v.shape != shape for v in entries.values()):
            raise _fail(path, f"holds optimizer state of another shape for {name}",
                        "use the same model and recipe, or a new checkpoint folder")
        if entries:
            state[index] = entries
    if len({frozenset(entries) for entries in state.values()}) > 1:  # e.g. an Adam moment missing
        raise _fail(path, "is incomplete or inconsistent (the optimizer state differs between parameters)")
    groups = []
    start = 0
    for group, current in zip(saved["param_groups"], optimizer.param_groups):
        restored = {k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in group.items()}
        restored["params"] = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        groups.append(restored)
    return {"state": state, "param_groups": groups}


def load_checkpoint(folder: Path, named: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig, data: dict, device: torch.device) -> dict | None:
    """Restore parameters, optimizer and RNG from ``folder``; the saved training state, or None without one.

    ``data`` describes the training windows (rows, columns); a checkpoint written with other settings,
    data or parameters, or a damaged one, gives a one-line LlmpressError.
    """
    path = folder / CHECKPOINT
    if not path.is_file():
        if (folder / LEGACY).exists():
            raise LlmpressError(f"{folder / LEGACY} is a pickle checkpoint of an older llmpress, which is not loaded "
                                "because unpickling can run code: delete it and train from the start, or use "
                                "another checkpoint_dir")
        log.info("no checkpoint in %s: training from the start", folder)
        return None
    if (folder / LEGACY).exists():
        log.warning("ignoring %s (a pickle checkpoint, never loaded); resuming from %s", folder / LEGACY, path)
    header, tensors = _read(path)
    _check_run(path, header, cfg, data)
    try:
        _restore_params(path, tensors, named)
        optimizer.load_state_dict(_optimizer_state(path, header, tensors, optimizer, named))
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        state = dict(header["state"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise _fail(path, f"is incomplete or inconsistent ({type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0]})") from None
    log.info("resuming from %s at step %s", path, state.get("step"))
    return state

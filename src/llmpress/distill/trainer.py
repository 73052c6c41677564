"""The teacher/student training loop of knowledge distillation and quantization-aware training.

A student (``llmpress.distill.trainable.Student``: the compressed model with the parameters that
train) learns from a teacher (the uncompressed model, frozen, in ``no_grad``) on token windows:
AdamW with linear warm-up then cosine decay, gradient accumulation, gradient clipping, and
``student.after_step()`` after every optimizer step (pruned weights re-zeroed). The logit losses
(``llmpress.distill.losses``) follow Hinton et al. 2015 (forward KL), MiniLLM (Gu et al. 2023,
reverse KL) and GKD (Agarwal et al. 2023, generalized JSD).

Deterministic with a seed: batches come from per-epoch permutations drawn from
``Generator().manual_seed(seed + epoch)``, so the data order is a function of the step alone;
the global RNG (dropout) is seeded inside ``torch.random.fork_rng`` and the caller's is left
untouched. A checkpoint (``llmpress.distill.checkpoint``: safetensors plus a JSON header, written
atomically, only the last one kept) holds the trainable parameters, the optimizer, the schedule's
horizon, the step, the data position and the RNG states, so a resumed run ends with bit-identical
weights to an uninterrupted one. A run that finishes deletes its checkpoint unless asked to keep it;
an interrupted one (``stop_at``, an exception, a kill) leaves the last one for ``resume``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..calib import calibration_dtype
from ..errors import LlmpressError
from .checkpoint import CHECKPOINT, load_checkpoint, remove_checkpoint, save_checkpoint
from .config import TrainConfig
from .losses import LossConfig, distill_loss, needs_hidden, needs_teacher

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT", "TrainConfig", "batch_indices", "learning_rate", "train"]
_PROBE_STEPS = 3  # with max_seconds: steps timed before the schedule's horizon is fixed


def learning_rate(cfg: TrainConfig, step: int, horizon: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) for a run of ``horizon`` steps."""
    warmup = min(cfg.warmup, horizon // 2)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(horizon - warmup, 1)
    if cfg.schedule == "linear":
        return cfg.lr * (1 - progress)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(micro_batch: int, n: int, batch_size: int, seed: int) -> Tensor:
    """Rows of micro-batch ``micro_batch``: consecutive slices of per-epoch permutations of ``range(n)``.

    Epoch e's order is ``randperm(n, Generator().manual_seed(seed * 1_000_003 + e))``; a batch may span
    two epochs. A pure function of its arguments, so resuming needs only the position.
    """
    start = micro_batch * batch_size
    rows, cache = [], {}
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, n)
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        rows.append(int(cache[epoch][offset]))
    return torch.tensor(rows)


def _autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    return torch.float32 if name == "float32" else calibration_dtype(name, device)


def _named_params(model: nn.Module, params: list[nn.Parameter]) -> dict[str, nn.Parameter]:
    """The trainable parameters by their name in ``model`` (the checkpoint's keys)."""
    wanted = {id(p) for p in params}
    named = {n: p for n, p in model.named_parameters() if id(p) in wanted}
    if len(named) != len(wanted):
        raise LlmpressError("some trainable parameters are not part of the student model: build the student "
                            "with llmpress.distill.prepare_student")
    return named


@dataclass
class _State:
    """What a checkpoint stores besides the weights and the optimizer."""

    step: int = 0
    horizon: int = 0
    tokens: int = 0
    seconds: float = 0.0
    log: list = dataclasses.field(default_factory=list)


def _forward(model: nn.Module, ids: Tensor, hidden: bool, cache=None):
    """The model's outputs on ``ids``; ``cache``: a function making the student's training KV cache
    (``Student.kv_cache``: the KV cache's rounding fake-quantized), else no cache."""
    if cache is not None:
        return model(input_ids=ids, past_key_values=cache(), use_cache=True, output_hidden_states=hidden)
    return model(input_ids=ids, use_cache=False, output_hidden_states=hidden)


def _micro_step(student, teacher, ids: Tensor, loss_cfg: LossConfig, scale: float, autocast) -> tuple[Tensor, dict]:
    """Forward both models on one micro-batch, backward the student's scaled loss; (loss, parts)."""
    hidden = needs_hidden(loss_cfg)
    with autocast():
        teacher_out = None
        if teacher is not None:
            with torch.no_grad():
                teacher_out = _forward(teacher, ids, hidden)
        student_out = _forward(student.model, ids, hidden, student.kv_cache)
        loss, parts = distill_loss(student_out, teacher_out, ids, loss_cfg)
    (loss * scale).backward()
    return loss.detach(), parts


def _horizon_after_probe(cfg: TrainConfig, state: _State, probe_start: float) -> int:
    """With a time budget: the horizon from the speed of steps 2..PROBE (step 1 carries warm-up costs)."""
    per_step = (time.perf_counter() - probe_start) / (_PROBE_STEPS - 1)
    left = cfg.max_seconds - state.seconds
    planned = state.step + int(left // max(per_step, 1e-9))
    return max(state.step, min(cfg.steps, planned))


def train(student, teacher: nn.Module | None, ids: Tensor, loss_cfg: LossConfig, cfg: TrainConfig, *,
          checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = False,
          device: str | torch.device = "cpu", stop_at: int | None = None, keep_checkpoint: bool = False) -> dict:
    """Train ``student.params`` to match ``teacher`` on the (N, L) token windows ``ids``; returns a history.

    ``teacher`` may be None when the loss needs none (``LossConfig(kind="ce")``: next-token training).
    ``checkpoint_dir``: where ``last.safetensors`` is written every ``cfg.checkpoint_every`` steps and
    when the call ends early; ``resume``: continue from it (same settings and data, else LlmpressError;
    none there: from the start). ``stop_at``: end this call after that optimizer step (an interruption;
    the schedule still runs to ``cfg.steps``). A run that reaches its end (steps or time budget) deletes
    the checkpoint, unless ``keep_checkpoint``.
    The models are moved to ``device`` and back. History: ``steps``, ``tokens``, ``seconds`` (training
    time, summed over resumed runs), ``tokens_per_s``, ``loss`` and ``parts`` of the last logged step,
    ``log`` (one entry per ``log_every`` steps), ``horizon`` and why it ``stopped`` (steps | time | stop_at).
    """
    if needs_teacher(loss_cfg) and teacher is None:
        raise LlmpressError(f"loss {loss_cfg.kind!r} needs a teacher model: pass one, or use kind 'ce'")
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise LlmpressError(f"training ids must be (windows, length >= 2), got {tuple(ids.shape)}: use longer windows")
    if not student.params:
        raise LlmpressError("the student has no trainable parameters: choose train all, lora or norms")
    if not needs_teacher(loss_cfg):
        teacher = None  # e.g. next-token training on generated text: no teacher forwards
    device = torch.device(device)
    if resume and checkpoint_dir is None:
        raise LlmpressError("resume needs a checkpoint folder: pass checkpoint_dir")
    homes = [_home(m) for m in (student.model, teacher)]
    student.model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    modes = student.model.training
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(cfg.seed)
            student.model.train()
            folder = Path(checkpoint_dir) if checkpoint_dir else None
            return _loop(student, teacher, ids, loss_cfg, cfg, folder, resume, progress, device, stop_at,
                         keep_checkpoint)
    finally:
        student.model.train(modes)
        for model, home in zip((student.model, teacher), homes):
            if model is not None and home is not None:
                model.to(home)


def _home(model: nn.Module | None) -> torch.device | None:
    if model is None:
        return None
    return next(model.parameters()).device


def _param_groups(student, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: the QAT layers' latent weights (codebook layers: their tables) at ``qat_lr_scale`` × lr,
    everything else at lr."""
    qat = {id(module.latent) for module in student.qat.values()}
    groups = [{"params": [p for p in student.params if id(p) not in qat], "lr_scale": 1.0},
              {"params": [p for p in student.params if id(p) in qat], "lr_scale": float(cfg.qat_lr_scale)}]
    return [g for g in groups if g["params"]]


def _loop(student, teacher, ids, loss_cfg, cfg: TrainConfig, folder: Path | None, resume: bool,
          progress: bool, device: torch.device, stop_at: int | None, keep_checkpoint: bool = False) -> dict:
    from tqdm.auto import tqdm

    named = _named_params(student.model, student.params)
    optimizer = torch.optim.AdamW(_param_groups(student, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = {"rows": int(ids.shape[0]), "columns": int(ids.shape[1])}
    saved = load_checkpoint(folder, named, optimizer, cfg, data, device) if resume else None
    try:
        state = _State(**saved) if saved else _State()
    except TypeError:
        raise LlmpressError(f"checkpoint in {folder} has a malformed training state: delete it to train from "
                            "the start, or use another checkpoint_dir") from None
    state.horizon = state.horizon or cfg.steps
    amp = _autocast_dtype(cfg.dtype, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp != torch.float32 else nullcontext
    end = min(state.horizon, stop_at) if stop_at is not None else state.horizon
    bar = tqdm(total=state.horizon, initial=state.step, desc="distill", unit="step", disable=not progress,
               leave=False)
    stopped, started, probe_start = "steps", time.perf_counter(), None
    seconds0, tokens_per_step = state.seconds, cfg.batch_size * cfg.grad_accum * ids.shape[1]
    parts: dict = {}
    while state.step < end:
        if cfg.max_seconds is not None and state.seconds >= cfg.max_seconds:
            stopped = "time"
            break
        lr = learning_rate(cfg, state.step, state.horizon)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        losses, sums = [], {}
        for k in range(cfg.grad_accum):
            rows = batch_indices(state.step * cfg.grad_accum + k, len(ids), cfg.batch_size, cfg.seed)
            loss, micro = _micro_step(student, teacher, ids[rows].to(device), loss_cfg, 1 / cfg.grad_accum, autocast)
            losses.append(loss)
            for name, value in micro.items():
                sums[name] = sums.get(name, 0.0) + value / cfg.grad_accum
        parts = sums
        norm = nn.utils.clip_grad_norm_(student.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        student.after_step()
        state.step += 1
        state.tokens += tokens_per_step
        state.seconds = seconds0 + time.perf_counter() - started
        out_of_time = cfg.max_seconds is not None and state.seconds >= cfg.max_seconds
        if state.step % cfg.log_every == 0 or state.step == end or out_of_time:
            entry = {"step": state.step, "loss": float(torch.stack(losses).mean()), "lr": lr,
                     "grad_norm": None if norm is None else float(norm), **parts}
            state.log.append(entry)
            log.debug("distill step %d: %s", state.step, entry)
        bar.update(1)
        bar.set_postfix(loss=f"{float(losses[-1]):.4f}", tok_s=f"{state.tokens / max(state.seconds, 1e-9):,.0f}")
        if cfg.max_seconds is not None and state.horizon == cfg.steps:
            if state.step == 1:
                probe_start = time.perf_counter()
            elif state.step == _PROBE_STEPS and probe_start is not None:
                state.horizon = _horizon_after_probe(cfg, state, probe_start)
                end = min(state.horizon, stop_at) if stop_at is not None else state.horizon
                bar.total = state.horizon
        if folder is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            save_checkpoint(folder, named, optimizer, dataclasses.asdict(state), cfg, data, device)
    bar.close()
    if stop_at is not None and state.step >= stop_at and state.step < state.horizon:
        stopped = "stop_at"
    if folder is not None:
        if stopped == "stop_at" or keep_checkpoint:
            path = save_checkpoint(folder, named, optimizer, dataclasses.asdict(state), cfg, data, device)
            log.info("checkpoint at step %d kept in %s", state.step, path)
        else:  # finished: nothing to resume, and the file is as large as the trainable weights plus Adam's 2x
            remove_checkpoint(folder)
    return _history(state, stopped, parts)


def _history(state: _State, stopped: str, parts: dict) -> dict:
    last = state.log[-1] if state.log else {}
    return {"steps": state.step, "tokens": state.tokens, "seconds": state.seconds,
            "tokens_per_s": state.tokens / state.seconds if state.seconds > 0 else 0.0,
            "loss": last.get("loss"), "parts": dict(parts), "log": list(state.log),
            "horizon": state.horizon, "stopped": stopped}

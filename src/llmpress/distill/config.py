"""How the distillation trainer optimizes (``TrainConfig``), apart from the loop itself.

Its own module so the ``distill`` recipe stage can take these fields as its own
(``DistillConfig`` extends it) without importing the training loop when a recipe is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import LlmpressError

DTYPES = ("auto", "float32", "bfloat16")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``steps``: optimizer steps (each ``grad_accum`` micro-batches of ``batch_size``
    windows); ``warmup``: linear warm-up steps (at most half the horizon); ``schedule``: decay after it.
    ``max_seconds``: stop after this much training time; the schedule's horizon is then fixed after
    the first steps from their measured speed, so the decay ends near the budget. ``dtype``: autocast
    of the forwards ("auto": bfloat16 where the device runs it natively, see ``calib.calibration_dtype``).
    ``checkpoint_every``: optimizer steps between checkpoints (0 = only with an explicit directory, at the end).
    ``qat_lr_scale``: learning-rate multiplier for the latent weights of QAT layers. They start exactly
    on grid points and a code flips only once its weight has moved half a grid step, which at the
    learning rate that suits norms and dense weights takes far more steps than a CPU budget holds.
    """

    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 4
    grad_accum: int = 1
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    max_seconds: float | None = None
    dtype: str = "auto"
    schedule: str = "cosine"
    checkpoint_every: int = 0
    log_every: int = 10
    qat_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup", "seed", "checkpoint_every"):
            _check_int(name, getattr(self, name), 0)
        for name in ("lr", "weight_decay", "max_grad_norm", "qat_lr_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise LlmpressError(f"{name}={value!r} is invalid: use a non-negative number, e.g. lr: 1e-4")
        if self.lr == 0:
            raise LlmpressError("lr=0 trains nothing: use a positive learning rate, e.g. 1e-4")
        if self.qat_lr_scale == 0:
            raise LlmpressError("qat_lr_scale=0 freezes the QAT weights: use a positive multiplier, e.g. 1 or 10")
        if self.max_seconds is not None and (isinstance(self.max_seconds, bool)
                                             or not isinstance(self.max_seconds, (int, float))
                                             or not self.max_seconds > 0):
            raise LlmpressError(f"max_seconds={self.max_seconds!r} is invalid: use a positive number of seconds "
                                "or null")
        if self.dtype not in DTYPES:
            raise LlmpressError(f"dtype={self.dtype!r} is invalid: use one of {', '.join(DTYPES)}")
        if self.schedule not in SCHEDULES:
            raise LlmpressError(f"schedule={self.schedule!r} is invalid: use one of {', '.join(SCHEDULES)}")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LlmpressError(f"{name}={value!r} is invalid: use an integer >= {low}")

"""How the distillation trainer optimizes (``TrainConfig``), apart from the loop itself.

Its own module so the ``distill`` recipe stage can take these fields as its own
(``DistillConfig`` extends it) without importing the training loop when a recipe is read;
likewise the annotations of the loss and generation fields, which ``DistillConfig`` declares
under its own names and passes on to ``LossConfig`` and ``GenerateConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from ..config import Check, Config
from ..errors import LlmpressError

DTYPES = ("auto", "float32", "bfloat16")
SCHEDULES = ("cosine", "linear", "constant")
AtLeastOne = Annotated[int, Check(ge=1)]
AtLeastZero = Annotated[int, Check(ge=0)]
Rate = Annotated[float, Check(ge=0, advice="use a non-negative number, e.g. lr: 1e-4")]  # finite, as every float field
# losses.LossConfig
LossTemperature = Annotated[float, Check(gt=0.0)]
LossBeta = Annotated[float, Check(ge=0.0, le=1.0, advice="use a number >= 0.0 and <= 1.0")]
LossWeight = Annotated[float, Check(ge=0.0)]
# blackbox.GenerateConfig
SamplingTemperature = Annotated[float, Check(ge=0, advice="use a number >= 0 (0 = greedy)")]
TopP = Annotated[float, Check(gt=0, le=1)]


@dataclass(frozen=True)
class TrainConfig(Config):
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

    steps: AtLeastOne = 200
    lr: Rate = 1e-4
    batch_size: AtLeastOne = 4
    grad_accum: AtLeastOne = 1
    warmup: AtLeastZero = 10
    weight_decay: Rate = 0.0
    max_grad_norm: Rate = 1.0
    seed: AtLeastZero = 0
    max_seconds: Annotated[float | None, Check(gt=0, advice="use a positive number of seconds or null")] = None
    dtype: Annotated[str, Check(choices=DTYPES)] = "auto"
    schedule: Annotated[str, Check(choices=SCHEDULES)] = "cosine"
    checkpoint_every: AtLeastZero = 0
    log_every: AtLeastOne = 10
    qat_lr_scale: Rate = 1.0

    def check(self) -> None:
        if self.lr == 0:
            raise LlmpressError("lr=0 trains nothing: use a positive learning rate, e.g. 1e-4")
        if self.qat_lr_scale == 0:
            raise LlmpressError("qat_lr_scale=0 freezes the QAT weights: use a positive multiplier, e.g. 1 or 10")

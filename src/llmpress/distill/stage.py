"""The ``distill`` recipe stage: recover what the stages before it lost, with the base model as teacher.

A Method of kind "model" (``llmpress.api.compress`` runs it between block-engine segments) that
declares the extra inputs it wants (``Method.inputs``): the teacher (a copy of the model taken
before the first stage), the tokenizer, the per-layer meta so far and the engine's ``results``.
It builds the student from the compressed model (``prepare_student``: pruned weights keep their
masks; quantized ones train on their own grid, i.e. quantization-aware training with a
straight-through estimator, or carry LoRA / QLoRA adapters; codebook layers keep their codes and train
their tables, ``llmpress.distill.codebook_qat``), trains it (``trainer.train``) on
windows of a data spec, or on text the teacher generated from prompts of that spec or from
nothing (``blackbox``), and folds the training wrappers back: the model keeps its format, and
``results`` gets the trained codes so the compressed-tensors export writes them.

Recipe: ``{method: distill, args: {loss: forward_kl, train: all, steps: 200, lr: 1e-4}}``;
see :class:`DistillConfig`. The training modules are imported on first use, so the registry
(imported by every command) stays light.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated

import torch
from torch import Tensor, nn

from ..config import Check, PositiveInt
from ..data.sources import parse_spec
from ..errors import LlmpressError
from ..quant.kvgrid import KVBits
from ..registry import Method, register
from .config import (
    AtLeastOne,
    AtLeastZero,
    LossBeta,
    LossTemperature,
    LossWeight,
    SamplingTemperature,
    TopP,
    TrainConfig,
)

log = logging.getLogger(__name__)

SOURCES = ("data", "generated", "data-free")
LOSS_ALIASES = {"kl": "forward_kl", "rkl": "reverse_kl"}  # short names for recipes: distill(kl, steps=200)
TRAIN_CHOICES = ("all", "lora", "norms")  # llmpress.distill.trainable.TRAINABLE
_LOSS_FIELDS = {"loss": "kind", "temperature": "temperature", "beta": "beta", "hidden_weight": "hidden_weight",
                "ce_weight": "ce_weight"}
_GENERATE_FIELDS = {"prompts": "prompts", "prompt_len": "prompt_len", "new_tokens": "new_tokens",
                    "gen_temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                    "greedy_first": "greedy_first", "gen_batch_size": "batch_size", "seed": "seed"}


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """One distillation run. What trains: ``train`` all | lora | norms (``lora_rank``, ``lora_alpha``).
    Loss (``llmpress.distill.losses.LossConfig``): ``loss`` forward_kl | reverse_kl | jsd | ce,
    ``temperature``, ``beta`` (jsd), ``hidden_weight``, ``ce_weight``. Optimisation: the fields of
    ``TrainConfig``, inherited (``steps``, ``lr`` …); ``checkpoint_dir`` + ``resume`` continue an
    interrupted run (the checkpoint is deleted when training finishes, unless ``keep_checkpoint``). Data: ``source``
    data (windows of ``data``) | generated (the teacher continues
    prompts from ``data``) | data-free (the teacher writes from a random first token); ``samples``
    windows of ``seq_len`` tokens are drawn (seeded) from that text. Generation: ``prompts``,
    ``prompt_len``, ``new_tokens``, ``gen_temperature``, ``top_k``, ``top_p``, ``greedy_first``,
    ``gen_batch_size``; ``generated_path`` keeps the JSON-lines file. ``kv_bits``: the student's keys and
    values fake-quantized as the KV cache of that many bits (``llmpress eval --kv-bits``, its default groups;
    16 = off) stores them, so QAT of a W4A4 model learns around a 4-bit KV cache too.
    """

    label = "distill"

    train: Annotated[str, Check(choices=TRAIN_CHOICES)] = "all"
    lora_rank: PositiveInt = 16
    lora_alpha: Annotated[float, Check(gt=0, advice="use a positive number, e.g. 32")] = 32.0
    loss: str = "forward_kl"
    temperature: LossTemperature = 1.0
    beta: LossBeta = 0.5
    hidden_weight: LossWeight = 0.0
    ce_weight: LossWeight = 0.0
    checkpoint_dir: str | None = None
    resume: bool = False
    keep_checkpoint: bool = False
    source: Annotated[str, Check(choices=SOURCES)] = "data"
    data: str = "austen:calib"
    samples: PositiveInt = 256
    seq_len: Annotated[int, Check(ge=2, advice="use a positive integer")] = 512
    prompts: AtLeastOne = 64
    prompt_len: AtLeastOne = 32
    new_tokens: AtLeastOne = 256
    gen_temperature: SamplingTemperature = 1.0
    top_k: AtLeastZero = 50
    top_p: TopP = 1.0
    greedy_first: AtLeastZero = 0
    gen_batch_size: AtLeastOne = 8
    generated_path: str | None = None
    kv_bits: KVBits = 16

    def check(self) -> None:
        super().check()
        object.__setattr__(self, "loss", LOSS_ALIASES.get(self.loss, self.loss))
        if self.resume and not self.checkpoint_dir:
            raise LlmpressError("distill resume needs checkpoint_dir: name the folder of the interrupted run")
        if self.source != "data-free":
            parse_spec(self.data)  # a malformed spec fails when the recipe is read
        self.loss_config()
        if self.source != "data":
            self.generate_config()

    def loss_config(self):
        from .losses import LossConfig

        return LossConfig(**{dst: getattr(self, src) for src, dst in _LOSS_FIELDS.items()})

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})

    def generate_config(self):
        from .blackbox import GenerateConfig

        args = {dst: getattr(self, src) for src, dst in _GENERATE_FIELDS.items()}
        return GenerateConfig(data=None if self.source == "data-free" else self.data, **args)


def training_ids(cfg: DistillConfig, tokenizer, teacher: nn.Module | None, folder: Path, *,
                 device: torch.device, progress: bool = False) -> Tensor:
    """(cfg.samples, cfg.seq_len) training windows: from ``cfg.data``, or from text the teacher writes first."""
    from ..data import calibration_samples
    from .blackbox import dataset_spec, generate_dataset

    if tokenizer is None:
        raise LlmpressError("distillation needs the model's tokenizer to read its training text: pass one")
    spec = cfg.data
    if cfg.source != "data":
        if teacher is None:
            raise LlmpressError(f"distill source={cfg.source} needs a teacher to generate text: run it through "
                                "llmpress.compress, or pass teacher=")
        path = Path(cfg.generated_path) if cfg.generated_path else folder / "generated.jsonl"
        spec = dataset_spec(generate_dataset(teacher, tokenizer, cfg.generate_config(), path, device=device,
                                             progress=progress))
    return calibration_samples(tokenizer, spec, cfg.samples, cfg.seq_len, cfg.seed)


def distill_model(model: nn.Module, arch, cfg: DistillConfig, *, teacher: nn.Module | None, tokenizer,
                  layers: dict[str, dict] | None, results: dict | None, device: str | torch.device = "cpu",
                  progress: bool = False, ids: Tensor | None = None) -> tuple[dict[str, dict], dict]:
    """Distill ``model`` in place from ``teacher``; (per-layer meta updates, training history).

    ``ids``: training windows to use instead of drawing them from ``cfg`` (e.g. shared across runs).
    ``results`` (layer name -> Compressed) is updated in place with the trained codes of QAT layers.
    """
    from .trainable import prepare_student
    from .trainer import train

    device = torch.device(device)
    layers = layers or {}
    with tempfile.TemporaryDirectory(prefix="llmpress-distill-") as tmp:
        if ids is None:
            ids = training_ids(cfg, tokenizer, teacher, Path(tmp), device=device, progress=progress)
    student = prepare_student(model, arch, layers, results, cfg.train, lora_rank=cfg.lora_rank,
                              lora_alpha=cfg.lora_alpha)
    if cfg.kv_bits < 16:
        from ..quant.kvcache import training_kv_cache
        from ..quant.kvgrid import as_kv_config

        student.kv_cache = training_kv_cache(model, as_kv_config(cfg.kv_bits))
    history = train(student, teacher, ids, cfg.loss_config(), cfg.train_config(), checkpoint_dir=cfg.checkpoint_dir,
                    resume=cfg.resume, progress=progress, device=device, keep_checkpoint=cfg.keep_checkpoint)
    updates = student.finalize(results)
    model.eval()
    log.info("distilled (%s, %s, source %s): %d steps, %d tokens in %.1fs (%.0f tokens/s), last loss %s",
             cfg.train, cfg.loss, cfg.source, history["steps"], history["tokens"], history["seconds"],
             history["tokens_per_s"], history["loss"])
    summary = {"distill_steps": history["steps"], "distill_tokens": history["tokens"]}
    # only layers some stage compressed are reported: listing untouched dense ones would change size accounting
    meta = {name: {**update, **summary} for name, update in updates.items() if name in layers}
    return meta, history


def distill_stage(model: nn.Module, arch, samples: Tensor | None, cfg: DistillConfig, *,
                  device: str | torch.device = "cpu", batch_size: int = 8, progress: bool = False,
                  teacher: nn.Module | None = None, tokenizer=None, layers: dict[str, dict] | None = None,
                  results: dict | None = None, resume=None) -> dict[str, dict]:
    """The registry's ``distill`` method (kind "model"): :func:`distill_model`, returning the meta updates.

    ``samples`` (the recipe's calibration windows) and ``batch_size`` are not used: the stage draws
    its own training windows (``cfg.data``, ``cfg.samples`` × ``cfg.seq_len``) and batches (``cfg.batch_size``).
    ``resume`` (a :class:`llmpress.resume.Resume`, from ``compress`` with an output path): without a
    ``checkpoint_dir`` of the recipe's, the trainer's checkpoint goes there, every ``checkpoint_every`` steps
    (default: a tenth of the steps), and the same command run again after a kill continues from it.
    """
    from .losses import needs_teacher

    if resume is not None and resume.folder is not None and cfg.checkpoint_dir is None:
        cfg = dataclasses.replace(cfg, checkpoint_dir=str(resume.folder / resume.scope), resume=True,
                                  checkpoint_every=cfg.checkpoint_every or max(1, cfg.steps // 10))

    if teacher is None and (needs_teacher(cfg.loss_config()) or cfg.source != "data"):
        raise LlmpressError("the distill stage needs a teacher (the model before compression): run it through "
                            "llmpress.compress, which passes one")
    meta, _history = distill_model(model, arch, cfg, teacher=teacher, tokenizer=tokenizer, layers=layers,
                                   results=results, device=device, progress=progress)
    return meta


def _kd(**args) -> dict:
    return {"stages": [{"method": "distill", "args": {"lr": 1e-3, **args}}]}


# The model before compression teaches the compressed one; a stage of its own, so any "NAME+distill…" composes
# (load_recipe). "all" trains every block weight (pruned ones keep their mask, quantized ones train on their own
# grid = QAT), "lora"/"norms" only adapters / norms and biases. lr 1e-3 for every choice: better than 1e-4 in
# 60-second runs from both sparsegpt-24 and gptq-w3-g64. On a quantized model "distill" is already QAT; "qat"
# names it so ("gptq-w3-g64+qat(steps=500)"), with the QAT weights at 3x the lr: from gptq-w3-g64, 1500 s:
# 39.29 against 42.25 at 1x (README, distillation figures).
register(Method("distill", DistillConfig, distill_stage, (), "model", calibrated=False,
                inputs=("teacher", "tokenizer", "layers", "results", "resume")), recipes={
    "distill": _kd(loss="forward_kl", train="all"),
    "distill-lora": _kd(loss="forward_kl", train="lora"),
    "distill-norms": _kd(loss="forward_kl", train="norms"),
    "distill-blackbox": _kd(loss="ce", source="generated"),
    "distill-data-free": _kd(loss="ce", source="data-free", greedy_first=3),
    "qat": _kd(loss="forward_kl", train="all", qat_lr_scale=3.0),
})

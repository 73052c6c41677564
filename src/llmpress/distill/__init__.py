"""Recovery after compression: knowledge distillation, quantization-aware training, LoRA / QLoRA.

The base model teaches its compressed copy (Hinton et al. 2015; MiniLLM, Gu et al. 2023; GKD,
Agarwal et al. 2023), on real text or on text the teacher writes itself (black-box / data-free,
LLM-QAT, Liu et al. 2023)::

    import llmpress
    result = llmpress.compress("smollm2-135m", "gptq-w3-g64+qat")   # GPTQ int3, then QAT on its grid

or step by step::

    from llmpress.distill import LossConfig, TrainConfig, prepare_student, train
    student = prepare_student(model, arch, layers, results, train="lora")
    history = train(student, teacher, ids, LossConfig("forward_kl"), TrainConfig(steps=100))
    student.finalize(results)

Names are imported on first use, so that the registry (imported by every command) stays light.
"""

from importlib import import_module

_EXPORTS = {
    "LOSSES": "losses", "LossConfig": "losses", "distill_loss": "losses", "forward_kl": "losses",
    "reverse_kl": "losses", "generalized_jsd": "losses", "next_token_ce": "losses", "hidden_mse": "losses",
    "fake_quantize_ste": "qat", "QATLinear": "qat",
    "LoRALinear": "lora", "add_lora": "lora", "merge_lora": "lora",
    "TRAINABLE": "trainable", "Student": "trainable", "prepare_student": "trainable",
    "TrainConfig": "trainer", "train": "trainer", "learning_rate": "trainer", "batch_indices": "trainer",
    "GenerateConfig": "blackbox", "generate_dataset": "blackbox", "sample_continuations": "blackbox",
    "dataset_spec": "blackbox",
    "DistillConfig": "stage", "distill_stage": "stage", "distill_model": "stage", "training_ids": "stage",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'llmpress.distill' has no attribute {name!r}")

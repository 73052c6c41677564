"""Tiny random decoder-only models for every architecture llmpress supports.

Shared by all tests: ``from tiny_models import tiny_model, TINY_TYPES``.
Models are built offline from transformers config classes (never the hub):
hidden 64, 2 layers, 4 heads / 2 KV heads where the family has GQA,
intermediate 128, vocab 256, float32, eager attention, eval mode. Weights are
re-initialised so that tests are meaningful: linears ~ N(0, 1/in_features),
and every 1-D parameter (norm weights, biases) is perturbed so no two
channels are identical.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

TINY_TYPES: tuple[str, ...] = (
    "llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt",
)
# Also buildable, tested by test_archs but not looped over by every test.
EXTRA_TYPES: tuple[str, ...] = ("smollm3", "granite", "phi", "gemma3")

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB, POSITIONS = 64, 2, 4, 2, 128, 256, 256
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_LLAMA_LIKE = {
    "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "intermediate_size": INTERMEDIATE,
    "head_dim": HIDDEN // HEADS, "vocab_size": VOCAB, "max_position_embeddings": POSITIONS,
}
_DEFAULTS: dict[str, dict] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "mistral": {**_LLAMA_LIKE, "sliding_window": 8},
    "gemma3_text": {
        **_LLAMA_LIKE, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "phi3": {k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"},
    "phi": {k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"},
    "gpt2": {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": INTERMEDIATE,
             "vocab_size": VOCAB, "n_positions": POSITIONS},
    "gpt_neox": {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                 "intermediate_size": INTERMEDIATE, "vocab_size": VOCAB,
                 "max_position_embeddings": POSITIONS},
    "opt": {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "ffn_dim": INTERMEDIATE, "word_embed_proj_dim": HIDDEN, "vocab_size": VOCAB,
            "max_position_embeddings": POSITIONS},
}


def _gemma3_multimodal(**overrides) -> PretrainedConfig:
    """Gemma3Config (model_type 'gemma3'): a tiny vision tower plus the tiny text model."""
    text = {**_DEFAULTS["gemma3_text"], **_TOKENS, **overrides}
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 64, "image_size": 28, "patch_size": 14}
    return AutoConfig.for_model(
        "gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
        image_token_index=VOCAB - 1, boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3,
    )


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """A tiny float32 config of ``model_type``; ``overrides`` win over the defaults."""
    if model_type == "gemma3":
        config = _gemma3_multimodal(**overrides)
    elif model_type in _DEFAULTS:
        config = AutoConfig.for_model(model_type, **{**_DEFAULTS[model_type], **_TOKENS, **overrides})
    else:
        raise KeyError(f"no tiny config for '{model_type}'; known: {TINY_TYPES + EXTRA_TYPES}")
    config.dtype = torch.float32
    return config


@torch.no_grad()
def _reinit(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            fan_in = module.weight.shape[1] if isinstance(module, nn.Linear) else module.weight.shape[0]
            module.weight.normal_(0.0, fan_in ** -0.5, generator=generator)
    for param in model.parameters():
        if param.dim() == 1:
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def tiny_model(model_type: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny random causal LM of ``model_type``, float32, eager attention, eval mode.

    Deterministic in ``seed``; the global torch RNG is left untouched.
    """
    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    _reinit(model, torch.Generator().manual_seed(seed))
    return model.float().eval()


def random_ids(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    """Token ids that avoid the special and image tokens of the tiny configs."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB - 3, (batch, length), generator=generator)


TOKENIZER_TEXT = "\n".join(
    " ".join(("the a of and to in was she her he it for not with that miss had be Anne Elliot captain".split()
              * 3)[i:i + 9]).capitalize() for i in range(40))


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ≤ 300) trained here on a few lines; pair with vocab_size=len(tok)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<bos>"], show_progress=False)
    tk.train_from_iterator([TOKENIZER_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<bos>")


def tiny_gguf(path: Path) -> Path:
    """A small GGUF at ``path`` (llama, 1 block declared, an embedding only): header, key-values, one tensor."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

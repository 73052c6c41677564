"""Where the linears are: the architecture map, keyed by ``config.model_type``.

Following design.md ("Architectures are data, not subclasses"), every method
and the engine see a model only through an :class:`Arch`: the dotted path of
its decoder blocks, the linears of a block in true-sequential groups (linears
in one group share one input), and the norm/linear -> linears "feeds" that
AWQ/SmoothQuant may fold scales through. Adding an architecture is one table
entry plus one tiny-config test. A decoder-only causal LM missing from the
table is handled by :func:`discover_arch`, which traces block 0 with hooks.

Weights cross this boundary as ``(out, in)``: :func:`linear_weight` and
:func:`set_linear_weight` hide GPT-2's ``Conv1D`` ``(in, out)`` layout.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmpress.errors import LlmpressError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    """The layout of one decoder-only family; see the module docstring.

    ``feeds`` lists only folds that are exact: scaling the source's output
    channel ``j`` by ``1/s_j`` and the fed linears' input channel ``j`` by
    ``s_j`` leaves the block's output unchanged. A norm source computes
    ``normed * (norm_offset + weight)`` (+ bias), so Gemma's ``(1 + w)`` norms
    have ``norm_offset=1.0``. Sources named in ``mha_only_feeds`` (the
    ``v_proj -> o_proj`` fold) are exact only when ``num_key_value_heads ==
    num_attention_heads``: under GQA one ``v`` channel feeds several ``o``
    input channels. Sources in ``relu_only_feeds`` (OPT's ``fc1 -> fc2``) fold
    exactly through ReLU, which commutes with positive scales, and through
    nothing else. :func:`arch_for` drops both kinds where the config rules them
    out; code reading ``ARCHS`` directly must call :func:`specialise`.
    """

    name: str
    blocks: str
    groups: tuple[tuple[str, ...], ...]
    feeds: tuple[tuple[str, tuple[str, ...]], ...] = ()
    transposed: bool = False
    parallel_residual: bool = False
    norm_offset: float = 0.0
    mha_only_feeds: tuple[str, ...] = ()
    relu_only_feeds: tuple[str, ...] = ()

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every linear of a block, in group order."""
        return tuple(name for group in self.groups for name in group)


def attention_mlp(arch: Arch) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The (q, k, v, o) and (gate, up, down) linears of a block with separate q/k/v projections and a gated
    MLP, read from ``arch.groups``; None for any other layout (fused qkv, ungated MLP)."""
    if [len(group) for group in arch.groups] != [3, 1, 2, 1]:
        return None
    qkv, o, gate_up, down = arch.groups
    return qkv + o, gate_up + down


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")

LLAMA = Arch(
    name="llama",
    blocks="model.layers",
    groups=(_QKV, ("self_attn.o_proj",), _GATE_UP, ("mlp.down_proj",)),
    feeds=(
        ("input_layernorm", _QKV),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", _GATE_UP),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
    mha_only_feeds=("self_attn.v_proj",),
)

# Gemma3: sandwich norms; the MLP is fed by pre_feedforward_layernorm, while
# post_attention_layernorm normalises the attention output before the residual.
GEMMA3_TEXT = dataclasses.replace(
    LLAMA,
    name="gemma3_text",
    feeds=(
        ("input_layernorm", _QKV),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("pre_feedforward_layernorm", _GATE_UP),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
    norm_offset=1.0,
)

# Phi-3 fuses qkv and gate/up: the v->o and up->down folds would touch only a
# slice of the fused rows, so they are left out.
PHI3 = Arch(
    name="phi3",
    blocks="model.layers",
    groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    feeds=(
        ("input_layernorm", ("self_attn.qkv_proj",)),
        ("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ),
)

# Phi-2: parallel residual with one shared norm, so q, k, v and fc1 share an input.
_PHI_IN = (*_QKV, "mlp.fc1")
PHI = Arch(
    name="phi",
    blocks="model.layers",
    groups=(_PHI_IN, ("self_attn.dense",), ("mlp.fc2",)),
    feeds=(("input_layernorm", _PHI_IN), ("self_attn.v_proj", ("self_attn.dense",))),
    parallel_residual=True,
    mha_only_feeds=("self_attn.v_proj",),
)

GPT2 = Arch(
    name="gpt2",
    blocks="transformer.h",
    groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    feeds=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
    transposed=True,
)

# parallel_residual follows config.use_parallel_residual (arch_for applies it);
# True is the default of the Pythia/GPT-NeoX checkpoints.
GPT_NEOX = Arch(
    name="gpt_neox",
    blocks="gpt_neox.layers",
    groups=(
        ("attention.query_key_value",),
        ("attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    ),
    feeds=(
        ("input_layernorm", ("attention.query_key_value",)),
        ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    ),
    parallel_residual=True,
)

# The norm feeds hold for pre-LN OPT (do_layer_norm_before=True, all sizes but
# 350m); arch_for drops them for post-LN configs. fc1 -> fc2 folds through ReLU.
OPT = Arch(
    name="opt",
    blocks="model.decoder.layers",
    groups=(_QKV, ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    feeds=(
        ("self_attn_layer_norm", _QKV),
        ("self_attn.v_proj", ("self_attn.out_proj",)),
        ("final_layer_norm", ("fc1",)),
        ("fc1", ("fc2",)),
    ),
    mha_only_feeds=("self_attn.v_proj",),
    relu_only_feeds=("fc1",),
)

ARCHS: dict[str, Arch] = {
    "llama": LLAMA,
    "mistral": dataclasses.replace(LLAMA, name="mistral"),
    "qwen2": dataclasses.replace(LLAMA, name="qwen2"),
    "qwen3": dataclasses.replace(LLAMA, name="qwen3"),
    "smollm3": dataclasses.replace(LLAMA, name="smollm3"),
    "granite": dataclasses.replace(LLAMA, name="granite"),
    "gemma3_text": GEMMA3_TEXT,
    # Gemma3ForConditionalGeneration: the same text blocks inside the multimodal model.
    "gemma3": dataclasses.replace(GEMMA3_TEXT, name="gemma3", blocks="model.language_model.layers"),
    "phi3": PHI3,
    "phi": PHI,
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
    "opt": OPT,
}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _unsupported(model_type: str, reason: str) -> LlmpressError:
    known = ", ".join(sorted(ARCHS))
    return LlmpressError(
        f"unsupported architecture '{model_type}': llmpress supports {known} and other "
        f"decoder-only causal LMs, but {reason}; use a decoder-only causal LM "
        "(AutoModelForCausalLM) or add an entry to llmpress.models.archs.ARCHS"
    )


def specialise(arch: Arch, config) -> Arch:
    """``arch`` adjusted to one config: GQA, non-ReLU, post-LN OPT, NeoX's residual flag."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    feeds = arch.feeds
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if kv_heads != heads:
        feeds = tuple(feed for feed in feeds if feed[0] not in arch.mha_only_feeds)
    if getattr(text, "activation_function", "relu") != "relu":
        feeds = tuple(feed for feed in feeds if feed[0] not in arch.relu_only_feeds)
    if not getattr(text, "do_layer_norm_before", True):
        linears = set(arch.linear_names)
        feeds = tuple(feed for feed in feeds if feed[0] in linears)
    parallel = arch.parallel_residual
    if isinstance(getattr(text, "use_parallel_residual", None), bool):
        parallel = text.use_parallel_residual
    return dataclasses.replace(arch, feeds=feeds, parallel_residual=parallel)


def arch_for(model: nn.Module) -> Arch:
    """The :class:`Arch` of ``model``: the table entry, else a discovered one."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    if model_type in ARCHS:
        return specialise(ARCHS[model_type], config)
    if config is None:
        raise _unsupported(model_type, "the model has no transformers config")
    if getattr(config, "is_encoder_decoder", False):
        raise _unsupported(model_type, "it is an encoder-decoder model")
    can_generate = getattr(model, "can_generate", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if can_generate is None or not can_generate() or get_head is None or get_head() is None:
        raise _unsupported(model_type, "it has no causal LM head (encoder-only?)")
    if not _is_causal(model):
        raise _unsupported(model_type, "its attention is bidirectional (an encoder), not causal")
    arch = discover_arch(model)
    logger.warning(
        "no table entry for model_type '%s'; discovered blocks '%s' with groups %s and no "
        "feeds (AWQ/SmoothQuant folds off); add an entry to llmpress.models.archs.ARCHS",
        model_type, arch.blocks, arch.groups,
    )
    return arch


def _is_causal(model: nn.Module) -> bool:
    """True when changing the last token leaves the logits of earlier positions unchanged."""
    vocab = getattr(model.config.get_text_config(), "vocab_size", None) or 2
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device if embeddings is not None else torch.device("cpu")
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % vocab
    with torch.no_grad():
        a = model(input_ids=ids).logits[0, :-1]
        b = model(input_ids=changed).logits[0, :-1]
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def get_blocks(model: nn.Module, arch: Arch) -> nn.ModuleList:
    """The ModuleList of decoder blocks at ``arch.blocks``."""
    try:
        blocks = model.get_submodule(arch.blocks)
    except AttributeError as err:
        raise RuntimeError(f"arch '{arch.name}': model has no module '{arch.blocks}'") from err
    if not isinstance(blocks, nn.ModuleList):
        kind = type(blocks).__name__
        raise RuntimeError(f"arch '{arch.name}': '{arch.blocks}' is {kind}, not a ModuleList")
    return blocks


def block_linears(block: nn.Module, arch: Arch) -> dict[str, nn.Module]:
    """Relative name -> linear module of one block, in group order.

    A factorized layer (``llmpress.lowrank.LowRankLinear``, which names its two plain
    linears in ``linear_children``) is listed as those linears, ``<name>.down`` and
    ``<name>.up``, so per-linear stages (RTN, GPTQ) quantize its factors.
    """
    found: dict[str, nn.Module] = {}
    for name in arch.linear_names:
        try:
            module = block.get_submodule(name)
        except AttributeError as err:
            raise RuntimeError(
                f"arch '{arch.name}': block {type(block).__name__} has no linear '{name}'"
            ) from err
        children = getattr(module, "linear_children", None)
        if children:
            found.update({f"{name}.{child}": module.get_submodule(child) for child in children})
        else:
            found[name] = module
    return found


def _is_transposed(module: nn.Module, arch: Arch) -> bool:
    """nn.Linear is (out, in) and Conv1D (in, out) whatever the table says."""
    if isinstance(module, nn.Linear):
        return False
    if isinstance(module, Conv1D):
        return True
    return arch.transposed


def input_representatives(arch: Arch, names) -> dict[str, str]:
    """Each linear name -> the first of ``names`` in its group: the one to hook for their shared input."""
    shared: dict[str, str] = {}
    for group in arch.groups:
        members = [n for n in group if n in names]
        for n in members:
            shared[n] = members[0]
    for n in names:
        shared.setdefault(n, n)
    return shared


def linear_weight(module: nn.Module, arch: Arch) -> torch.Tensor:
    """The weight as ``(out, in)``; for Conv1D a transposed view (writes go through)."""
    weight = module.weight.data
    return weight.t() if _is_transposed(module, arch) else weight


def set_linear_weight(module: nn.Module, arch: Arch, weight: torch.Tensor) -> None:
    """Copy an ``(out, in)`` ``weight`` into ``module`` in place, keeping its dtype/device."""
    target = linear_weight(module, arch)
    if tuple(weight.shape) != tuple(target.shape):
        raise RuntimeError(f"weight shape {tuple(weight.shape)} != (out, in) {tuple(target.shape)}")
    target.copy_(weight)


def linear_input_size(module: nn.Module, arch: Arch) -> int:
    """Number of input features of a linear, whatever its storage layout."""
    return linear_weight(module, arch).shape[1]


def _num_layers(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _find_blocks_path(model: nn.Module, model_type: str) -> str:
    count = _num_layers(model.config)
    if count is None:
        raise _unsupported(model_type, "its config names no layer count")
    candidates = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count
        and any(_is_linear(m) for m in module[0].modules())
    ]
    candidates = [c for c in candidates if not any(c.startswith(o + ".") for o in candidates)]
    if len(candidates) > 1:
        skip = ("vision", "audio", "encoder", "visual")
        candidates = [c for c in candidates if not any(s in c for s in skip)]
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(candidates)
        raise _unsupported(model_type, f"no single list of {count} decoder blocks was found ({found})")
    return candidates[0]


class _StopForward(Exception):
    """Raised by a hook after block 0 to end the tracing forward early."""


def _first_inputs(
    model: nn.Module, block: nn.Module, linears: dict[str, nn.Module]
) -> dict[str, torch.Tensor | None]:
    """Each linear's first input during a tiny forward, in call order."""
    seen: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_module, args, kwargs):
            if name not in seen:
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                seen[name] = tensors[0] if tensors else None
        return hook

    def stop(*_):
        raise _StopForward

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in linears.items()]
    handles.append(block.register_forward_hook(stop))
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device if embeddings is not None else torch.device("cpu")
    vocab = getattr(model.config.get_text_config(), "vocab_size", None) or 2
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    except _StopForward:
        pass
    else:
        raise RuntimeError("discovery: block 0 did not run during the forward")
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return False
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def discover_arch(model: nn.Module) -> Arch:
    """Build an :class:`Arch` for an unlisted decoder-only LM by tracing block 0.

    Linears whose first input is the same tensor form one group; groups come in
    the order they first run. Linears that never run go last, one per group.
    """
    model_type = getattr(model.config, "model_type", None) or type(model).__name__
    path = _find_blocks_path(model, model_type)
    block = model.get_submodule(path)[0]
    linears = {name: m for name, m in block.named_modules() if _is_linear(m)}
    inputs = _first_inputs(model, block, linears)
    groups: list[list[str]] = []
    heads: list[torch.Tensor] = []
    for name, tensor in inputs.items():
        match = next((i for i, head in enumerate(heads) if _same(tensor, head)), None)
        if match is None:
            groups.append([name])
            heads.append(tensor)
        else:
            groups[match].append(name)
    unused = [name for name in linears if name not in inputs]
    if unused:
        logger.warning("discovery: linears %s did not run on the trace; placed last", unused)
    groups.extend([name] for name in unused)
    transposed = any(isinstance(m, Conv1D) for m in linears.values())
    return Arch(
        name=model_type, blocks=path, groups=tuple(tuple(g) for g in groups),
        feeds=(), transposed=transposed,
    )

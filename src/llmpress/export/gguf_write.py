"""Write a compressed model as one GGUF file that llama.cpp loads, keeping the codes llmpress chose.

What llama.cpp's ``convert_hf_to_gguf.py`` writes for the same architectures, from the model in
memory: the architecture's hyperparameters under ``{arch}.*``, tensor names from the ``gguf``
package's ``TensorNameMap``, the q/k rows of the Llama family in llama.cpp's rotary order (the
converter's ``permute``; a permutation of whole rows, so codes and scales move with them), norms and
biases in F32, and the tokenizer. Each linear that a method quantized on a grid with groups of 32, or on a
K-quant grid (Q4_K, Q6_K), is written in its GGUF block type bit-exactly (:mod:`.gguf_blocks`); a layer
whose grid fits no type is refused with the reason, or, when the caller asks (``requantize``), re-rounded by
llama.cpp's own reference rounding (the ``gguf`` package's ``quants.quantize``) and reported. Tensors without codes
(embedding, head, unquantized linears) are written in the caller's types, re-rounded the same way
when those are block types, as llama.cpp's quantizer does (it stores SmolLM2's embedding as Q8_0 in a
Q4_0 file).

The tokenizer comes from the source GGUF when there is one (its ``tokenizer.*`` keys copied as they
are) and otherwise from the Hugging Face tokenizer: byte-level BPE only (GPT-2 style: Llama 3, Qwen,
SmolLM), with llama.cpp's pre-tokenizer name read off the tokenizer's own pre-tokenizer.

The file appears only when complete (a hidden temporary file beside it, then a link that never
replaces an existing file).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..compressed import Compressed, Grid
from ..errors import LlmpressError
from ..paths import make_public
from ..save import check_new_path
from .gguf_blocks import BLOCK_TYPES, block_type_for, pack_blocks, why_not
from .rotated import fits as rotated_model

log = logging.getLogger(__name__)

# transformers model_type -> llama.cpp architecture; True: q/k rows are permuted (llama.cpp's NORM rope)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False),
}
NOT_WRITTEN = {
    "gemma3_text": "Gemma 3 stores its norms as 1 + weight and four norms per block in llama.cpp, not written yet",
    "gemma3": "Gemma 3 stores its norms as 1 + weight and four norms per block in llama.cpp, not written yet",
    "phi3": "llama.cpp's Phi-3 layout (fused qkv and gate_up, its rope factors) is not written yet",
}
DENSE_TYPES = ("F32", "F16", "BF16")
META_KEY = "llmpress.meta"  # llmpress's record of the compression (recipe, per-layer records), JSON
TYPES = (*DENSE_TYPES, *BLOCK_TYPES)


@dataclass
class GgufReport:
    """What was written: each GGUF tensor's type, which tensors llmpress re-rounded, the file's size."""

    path: Path
    types: dict[str, str] = field(default_factory=dict)
    exact: list[str] = field(default_factory=list)  # linears written with their own codes
    rerounded: list[str] = field(default_factory=list)  # 2-D tensors rounded by the gguf package
    file_type: str = "F16"
    bytes: int = 0

    def summary(self) -> str:
        counts = Counter(self.types[n] for n in self.types if not n.endswith(("norm.weight", ".bias")))
        kinds = ", ".join(f"{n} {t}" for t, n in counts.most_common())
        line = f"{len(self.exact)} linears written with their own codes; 2-D tensors: {kinds}"
        if self.rerounded:
            line += f"; re-rounded by llama.cpp's rounding: {', '.join(self.rerounded[:4])}" + (
                f" and {len(self.rerounded) - 4} more" if len(self.rerounded) > 4 else "")
        return line

    def to_dict(self) -> dict:
        return {"path": str(self.path), "file_type": self.file_type, "bytes": self.bytes, "types": self.types,
                "exact": self.exact, "rerounded": self.rerounded}


def architecture(config) -> tuple[str, bool]:
    """(llama.cpp architecture, whether q/k rows are permuted) of a transformers config, or a one-line refusal."""
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    why = NOT_WRITTEN.get(model_type, "not written yet")
    raise LlmpressError(f"cannot write {model_type} models as GGUF ({why}); GGUF export supports "
                        f"{', '.join(ARCHITECTURES)}: use --format compressed-tensors or dense for this model")


def quantized_layers(model: nn.Module, results: dict[str, Compressed] | None = None,
                     layers: dict[str, dict] | None = None) -> dict[str, tuple[Compressed, Grid]]:
    """Linear name -> (codes, grid): from ``results`` (a compression's per-layer codes, or a pack-quantized
    folder's: ``compressed_tensors.packed_codes``) and from any ``QuantizedLinear`` modules of the model."""
    from ..quant.qlinear import QuantizedLinear

    found: dict[str, tuple[Compressed, Grid]] = {}
    layers = layers or {}
    for name, result in (results or {}).items():
        grid = Grid.of(layers[name]) if name in layers else result.grid
        if result.qweight is not None and result.scale is not None and grid is not None:
            found[name] = (result, grid)
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and name not in found:
            codes, zero = module.codes()
            grid = Grid(module.bits, -1 if module.group_size in (None, -1) else module.group_size, module.sym)
            found[name] = (Compressed(None, codes, module.weight_scale.float(), zero, grid=grid), grid)
    return found


def _name_map(config, arch: str):
    """The ``gguf`` package's map from transformers tensor names to llama.cpp's for ``arch``."""
    from gguf import get_tensor_name_map
    from gguf.constants import MODEL_ARCH_NAMES

    return get_tensor_name_map(next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch),
                               int(config.num_hidden_layers))


def linear_names(model: nn.Module) -> dict[str, str]:
    """Each linear's module name -> the GGUF tensor name of its weight (``blk.0.attn_q.weight``, ...)."""
    arch, _ = architecture(model.config)
    names = _name_map(model.config, arch)
    found = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, module in model.named_modules():
        if tied and name == "lm_head":  # no tensor of its own in the file
            continue
        if isinstance(module, nn.Linear) or hasattr(module, "weight_packed"):
            mapped = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
            if mapped is not None:
                found[name] = mapped
    return found


def _permute_rows(x: Tensor, heads: int) -> Tensor:
    """llama.cpp's order of the q/k rows: within each head, the two rotary halves interleaved."""
    rows = x.shape[0]
    return x.reshape(heads, 2, rows // heads // 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise LlmpressError(f"cannot write rope scaling '{kind}' to GGUF yet: export the model with "
                            "--format compressed-tensors or dense")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _hyperparameters(writer, config, arch: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_vocab_size(int(config.vocab_size))
    if head_dim != config.hidden_size // heads or arch == "qwen3":
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, read off its pre_tokenizer.

    Llama 3 ("llama-bpe") splits numbers in runs of up to 3 digits, Qwen2 ("qwen2") one digit at a time, both
    with a case-insensitive contraction regex; SmolLM ("smollm") splits digits first, then GPT-2's regex;
    plain GPT-2 ("gpt-2") is the byte-level regex alone. Anything else: "default" (llama.cpp warns).
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regexes = [str((p.get("pattern") or {}).get("Regex", "")) for p in parts if p.get("type") == "Split"]
    digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts)
    byte_regex = any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts)
    if any("(?i:'s|'t" in r and r"\p{N}{1,3}" in r for r in regexes):
        return "llama-bpe"
    if any("(?i:'s|'t" in r and r"\p{N}|" in r for r in regexes):
        return "qwen2"
    if not regexes and digits and byte_regex:
        return "smollm"
    if not regexes and byte_regex and len(parts) == 1:
        return "gpt-2"
    return "default"


def _tokenizer_from_gguf(writer, source: Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source)
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.") and f.types:
            sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)


def _tokenizer_from_hf(writer, tokenizer, vocab_size: int) -> None:
    from gguf import SpecialVocab, TokenType

    with tempfile.TemporaryDirectory(prefix="llmpress-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        if not path.is_file():
            raise LlmpressError("this tokenizer has no tokenizer.json (a slow or SentencePiece tokenizer): GGUF "
                                "export writes byte-level BPE tokenizers only; export a model with a fast tokenizer")
        tj = json.loads(path.read_text(encoding="utf-8"))
        model = tj.get("model") or {}
        byte_level = "ByteLevel" in json.dumps([tj.get("decoder"), tj.get("pre_tokenizer")])
        if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
            raise LlmpressError(f"tokenizer model {model.get('type')} is not byte-level BPE: GGUF export writes "
                                "byte-level BPE tokenizers only (Llama 3, Qwen, SmolLM); this model's is not yet")
        ids = {i: t for t, i in tokenizer.get_vocab().items()}
        added = tokenizer.added_tokens_decoder
        tokens, types = [], []
        for i in range(vocab_size):
            if i not in ids:
                tokens.append(f"[PAD{i}]")
                types.append(TokenType.UNUSED)
            else:
                tokens.append(ids[i])
                types.append((TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED) if i in added
                             else TokenType.NORMAL)
        pre = pre_tokenizer_name(tj)
        if pre == "default":
            log.warning("the tokenizer's pre-tokenizer matches none llama.cpp names: written as 'default'")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        SpecialVocab(tmp, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _dense_array(x: Tensor, kind: str) -> tuple[np.ndarray, object]:
    """A tensor without codes as (array, raw_dtype) in GGUF type ``kind`` (block types re-rounded)."""
    from gguf import GGMLQuantizationType, quants

    x = x.detach().float().cpu()
    if kind == "F32" or x.dim() == 1:
        return x.numpy(), None
    if kind == "F16":
        return x.to(torch.float16).numpy(), None
    qtype = GGMLQuantizationType[kind]
    return quants.quantize(x.numpy(), qtype), qtype


def _check_type(kind: str, what: str) -> str:
    kind = kind.upper()
    if kind not in TYPES:
        raise LlmpressError(f"unknown GGUF type '{kind}' for {what}: use one of {', '.join(TYPES)}")
    return kind


def check_gguf_out(out: str | Path) -> Path:
    """``out`` as a new .gguf file path in an existing, writable folder (else a one-line error)."""
    path = Path(out).expanduser()
    if path.suffix != ".gguf":
        raise LlmpressError(f"GGUF output {path} must end in .gguf: choose a --out FILE.gguf")
    return check_new_path(path, "--out", "GGUF file")


def write_gguf(model: nn.Module, tokenizer, out: str | Path, results: dict[str, Compressed] | None = None,
               layers: dict[str, dict] | None = None, dense: str = "F16", embedding: str | None = None,
               requantize: str | None = None, source_gguf: str | Path | None = None,
               name: str | None = None, meta: dict | None = None) -> GgufReport:
    """Write ``model`` to the new file ``out`` (.gguf) with each quantized linear's own codes; see the module
    docstring. ``dense``: GGUF type of 2-D tensors without codes; ``embedding``: type of the embedding and an
    untied head (default Q8_0 when some linear has codes, else ``dense``); ``requantize``: block type that
    re-rounds linears whose grid fits none (default: refuse them); ``source_gguf``: a GGUF whose tokenizer
    is copied; ``meta``: llmpress's record of the compression, stored as JSON under ``llmpress.meta``."""
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType

    path = check_gguf_out(out)
    config = model.config
    if rotated_model(model, {}, {}):
        raise LlmpressError("the model computes online Hadamard transforms (rotate(online=true)) or int4 activations "
                            "(w4a4), which llama.cpp does not: save it as a folder (--format auto)")
    arch, permute = architecture(config)
    dense = _check_type(dense, "--dense-type")
    requantize = None if requantize is None else _check_type(requantize, "--requantize")
    if requantize is not None and requantize not in BLOCK_TYPES:
        raise LlmpressError(f"--requantize takes a block type ({', '.join(BLOCK_TYPES)}), not {requantize}")
    quantized = quantized_layers(model, results, layers)
    grids = {n: Grid.of(layers[n]) if layers and n in layers else r.grid for n, r in (results or {}).items()}
    tables = [n for n, grid in grids.items() if grid is not None and grid.codebook]
    if tables:
        raise LlmpressError(f"{len(tables)} layer(s) are quantized on lookup tables (non-uniform grid), e.g. "
                            f"{tables[0]}, which no GGUF type holds: save them as a folder (--format auto) or "
                            "compress with a GGUF recipe (gptq-q4_0, rtn-q4_1, ...)")
    embedding = _check_type(embedding or ("Q8_0" if quantized else dense), "--embedding-type")

    refused = {n: why_not(g, r.qweight.shape[1]) for n, (r, g) in quantized.items()
               if block_type_for(g, r.qweight.shape[1]) is None}
    if refused and requantize is None:
        layer, why = next(iter(refused.items()))
        raise LlmpressError(f"{len(refused)} quantized layer(s) fit no GGUF type, e.g. {layer}: {why}; compress with "
                            "a GGUF recipe (gptq-q4_0, rtn-q4_1, ...) or pass --requantize Q4_0 to re-round them")

    names = _name_map(config, arch)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    report = GgufReport(path)

    def gguf_name(hf: str) -> str:
        mapped = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise LlmpressError(f"tensor {hf} has no GGUF name for {arch}: this model's layout is not written yet")
        return mapped

    def rows(hf: str, x: Tensor) -> Tensor:
        if permute and hf.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return _permute_rows(x, heads)
        if permute and hf.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return _permute_rows(x, kv_heads)
        return x

    tensors: list[tuple[str, np.ndarray, object]] = []
    for hf, (result, grid) in quantized.items():
        target = gguf_name(hf + ".weight")
        kind = block_type_for(grid, result.qweight.shape[1])
        if kind is None:
            from ..primitives import dequantize

            W = dequantize(result.qweight, result.scale, result.zero if result.zero is not None else
                           torch.zeros_like(result.scale), grid.group)
            array, raw = _dense_array(rows(hf + ".weight", W), requantize)
            tensors.append((target, array, raw))
            report.types[target] = requantize
            report.rerounded.append(target)
            continue
        zero = None if result.zero is None else rows(hf + ".weight", result.zero)
        data = pack_blocks(rows(hf + ".weight", result.qweight), rows(hf + ".weight", result.scale), zero, kind)
        tensors.append((target, data, GGMLQuantizationType[kind.name]))
        report.types[target] = kind.name
        report.exact.append(target)
    skip = {f"{n}.weight" for n in quantized}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf, param in model.named_parameters():
        if hf in skip or (tied and hf.startswith("lm_head.")):
            continue
        target = gguf_name(hf)
        kind = "F32" if param.dim() == 1 else embedding if target in ("token_embd.weight", "output.weight") else dense
        array, raw = _dense_array(rows(hf, param), kind)
        tensors.append((target, array, raw))
        report.types[target] = kind if param.dim() > 1 else "F32"
        if param.dim() > 1 and kind in BLOCK_TYPES:
            report.rerounded.append(target)

    linear = Counter(report.types[t] for t in report.exact) or Counter([dense])
    report.file_type = linear.most_common(1)[0][0]
    # llama.cpp names the K-quant files by mix; a file of Q4_K linears is its "Q4_K_S" (mostly Q4_K)
    ftype = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_K": "MOSTLY_Q4_K_S"}.get(
        report.file_type, f"MOSTLY_{report.file_type}")
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = GGUFWriter(tmp, arch)
        writer.add_name(name or str(getattr(config, "_name_or_path", "") or "llmpress model"))
        _hyperparameters(writer, config, arch)
        writer.add_file_type(int(LlamaFileType[ftype]))
        writer.add_quantization_version(2)
        writer.add_string("general.quantized_by", "llmpress")
        if meta is not None:
            writer.add_string(META_KEY, json.dumps(meta))
        if source_gguf is not None:
            _tokenizer_from_gguf(writer, Path(source_gguf))
        elif tokenizer is not None:
            _tokenizer_from_hf(writer, tokenizer, int(config.vocab_size))
        for target, array, raw in sorted(tensors, key=lambda t: _order(t[0])):
            writer.add_tensor(target, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        make_public(tmp)
        os.link(tmp, path)  # never replaces a file that appeared meanwhile
    except FileExistsError as exc:
        raise LlmpressError(f"GGUF file {path} appeared while writing: choose a new --out path") from exc
    finally:
        tmp.unlink(missing_ok=True)
    report.bytes = path.stat().st_size
    return report


def _order(name: str) -> tuple:
    """Tensors in llama.cpp's usual order: token_embd, then block by block, then output_norm and output."""
    parts = name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), name)
    return (0 if parts[0] == "token_embd" else 2, 0, name)

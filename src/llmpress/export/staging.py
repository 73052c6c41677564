"""What the formats share when saving: modules swapped in for the write, and folders transformers must refuse.

:func:`swapped` puts a format's storage modules (packed, sparse) and its ``quantization_config``
into the model for the duration of one ``save_pretrained``, and restores the model afterwards.

Some layouts llmpress writes cannot be read by the installed transformers: factorized
(low-rank) layers, and compressed-tensors' sparse-bitmask layouts, whose decompressors
compressed-tensors 0.15+ dropped. Given a ``model.safetensors`` with other tensor names,
``AutoModelForCausalLM.from_pretrained`` builds the dense model, reports the real weights as
MISSING in a log message, and runs with random ones. So these folders keep their weights
under another file name (``<stem>.safetensors``, or ``<stem>.safetensors.index.json`` plus
its shards), which transformers does not look for: it raises "no file named
model.safetensors". ``llmpress.load_model`` reads them by their config (see the loaders).

:func:`save_renamed` writes through ``llmpress.save.save_model`` into a hidden staging
folder beside ``out``, renames the weights there, lets a caller adjust ``config.json``, and
renames the folder into place: ``out`` appears complete or not at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from ..errors import LlmpressError
from ..save import save_model

TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def rename_weights(folder: Path, stem: str) -> Path:
    """Rename ``model.safetensors`` (or the shard index) in ``folder`` to ``<stem>.safetensors[.index.json]``."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        target = folder / f"{stem}.safetensors.index.json"
        os.replace(index, target)
        return target
    target = folder / f"{stem}.safetensors"
    os.replace(folder / "model.safetensors", target)
    return target


def weight_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of ``folder``: ``<stem>`` ones when present, else ``model`` ones (older folders)."""
    for name in (stem, "model"):
        index = folder / f"{name}.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise LlmpressError(f"'{index}' is damaged: write the folder again with llmpress compress") from None
            return [folder / f for f in files]
        if (folder / f"{name}.safetensors").is_file():
            return [folder / f"{name}.safetensors"]
    raise LlmpressError(f"'{folder}' has no {stem}.safetensors: the folder is incomplete; write it again "
                        "with llmpress compress")


def edit_config(folder: Path, change: Callable[[dict], None]) -> None:
    """Apply ``change`` to ``folder/config.json`` in place."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_renamed(model, tokenizer, out: str | Path, meta: dict, stem: str,
                 config_change: Callable[[dict], None] | None = None) -> Path:
    """``save_model`` to ``out`` with the weights as ``<stem>.safetensors`` (and ``config_change`` applied).

    The renaming happens inside ``save_model``'s own temporary folder (its ``finish`` step, right
    after ``model.save_pretrained``), so ``out`` still appears complete or not at all, and a killed run
    leaves only the temporary folder ``save_model`` knows how to find and remove.
    """

    def finish(folder: Path) -> None:
        rename_weights(folder, stem)
        if config_change is not None:
            edit_config(folder, config_change)

    return save_model(model, tokenizer, out, meta, finish)


@contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module], config: dict | None):
    """Temporarily put ``replacements`` (module name -> module) into ``model`` and ``config`` (when given)
    into its config as ``quantization_config``; both are restored afterwards, also on an error."""
    originals = {}
    had_config = hasattr(model.config, "quantization_config")
    old_config = getattr(model.config, "quantization_config", None)
    try:
        for name, module in replacements.items():
            originals[name] = model.get_submodule(name)
            model.set_submodule(name, module)
        if config is not None:
            model.config.quantization_config = config
        yield model
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)
        if had_config:
            model.config.quantization_config = old_config
        elif hasattr(model.config, "quantization_config"):
            del model.config.quantization_config

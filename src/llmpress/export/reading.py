"""Reading checkpoints written by others: what their readers raise, and transformers kept quiet meanwhile.

Shared by the model loader (``llmpress.models.loader``) and the format entries that read files
themselves (GGUF). Every reader here takes safetensors, JSON or GGUF: nothing we load runs code.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings


def reader_errors() -> tuple[type[BaseException], ...]:
    """What third-party readers raise on a damaged or mismatched checkpoint (not our bugs: their input is a file)."""
    import struct

    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return (ValueError, KeyError, IndexError, OSError, EOFError, OverflowError, struct.error, UnicodeError,
            pickle.UnpicklingError, SafetensorError, StrictDataclassError)


@contextlib.contextmanager
def quiet_transformers():
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

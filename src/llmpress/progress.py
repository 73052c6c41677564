"""--quiet for everything in the process: our bars and the libraries' (transformers, its GGUF reader)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def silenced(quiet: bool = True):
    """No tqdm bar from anyone while inside, when ``quiet``: transformers' GGUF conversion builds its own
    tqdm, and TQDM_DISABLE is read only when tqdm is first imported, which has happened by then."""
    if not quiet:
        yield
        return
    import tqdm
    from transformers.utils import logging as hf_logging

    original = tqdm.tqdm.__init__

    def silent(self, *a, **k):
        k["disable"] = True
        original(self, *a, **k)

    tqdm.tqdm.__init__ = silent
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tqdm.tqdm.__init__ = original
        if bars_were_on:
            hf_logging.enable_progress_bar()

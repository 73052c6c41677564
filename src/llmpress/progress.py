"""--quiet for everything in the process: our bars and the libraries' (transformers, its GGUF reader), and the
libraries' own warnings (the hub and datasets log through handlers of their own, so each line would show twice)."""

from __future__ import annotations

import contextlib
import logging
import os

LIBRARY_LOGGERS = ("transformers", "huggingface_hub", "datasets", "lm_eval")


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
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    verbosity = os.environ.get("DATASETS_VERBOSITY")
    os.environ["DATASETS_VERBOSITY"] = "error"  # datasets sets its level when first imported, maybe inside
    try:
        yield
    finally:
        if verbosity is None:
            os.environ.pop("DATASETS_VERBOSITY", None)
        else:
            os.environ["DATASETS_VERBOSITY"] = verbosity
        tqdm.tqdm.__init__ = original
        if bars_were_on:
            hf_logging.enable_progress_bar()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def bar(items=None, enabled: bool = True, desc: str = "", total: int | None = None, unit: str = "it",
        initial: int = 0):
    """A tqdm progress bar over ``items`` (or a manual one of ``total`` steps, ``initial`` of them done), shown
    when ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, disable=not enabled, leave=False, initial=initial)

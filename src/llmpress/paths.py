"""Where llmpress keeps downloaded assets and converted models."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LLMPRESS_CACHE``, else ``$XDG_CACHE_HOME/llmpress``, else ``~/.cache/llmpress``."""
    if env := os.environ.get("LLMPRESS_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "llmpress"

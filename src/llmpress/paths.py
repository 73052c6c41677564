"""Where llmpress keeps downloaded assets and converted models; the permissions of what it writes; whether the
process holding a lock still runs."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LLMPRESS_CACHE``, else ``$XDG_CACHE_HOME/llmpress``, else ``~/.cache/llmpress``."""
    if env := os.environ.get("LLMPRESS_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "llmpress"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_public(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions a plain ``open`` would:
    0666 / 0777 less the umask. ``tempfile`` and safetensors create private (0600/0700) files."""
    mask = _umask()
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place: a reader (or an interrupted
    run) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a lock's owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or a pid we cannot ask about): leave it alone
    return True

"""The one exception type users see, and the one-line wording of the failures we foresee.

Anything the user can fix (a missing path, an unknown alias, a malformed
recipe, a value out of range) raises ``LlmpressError`` with a one-line
message that names the problem and the fix. The CLI prints it and exits 2.
Where a failure is understood (a damaged model file, a recipe that is not
UTF-8) the code that reads it raises ``LlmpressError`` naming the file;
:func:`describe_failure` words the rest of the foreseeable failures (I/O,
decoding, resource limits) for the CLI's last-resort boundary.
"""

from __future__ import annotations

import errno
import json
import pickle
import struct


class LlmpressError(Exception):
    """A problem with the user's input, reported as one line; never a bug."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, or its type name when it has none."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _os_error(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    reason = exc.strerror or first_line(exc)
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device{where}: free some space or write to another disk"
    if exc.errno == errno.EROFS:
        return f"read-only file system{where}: write to a folder on a writable disk"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}: choose a path you may read and write"
    if exc.errno == errno.ENOENT:
        return f"no such file or folder{where}: check the path"
    return f"{reason}{where}: check the path, the disk and the network, then try again"


def foreseeable(exc: BaseException) -> bool:
    """Whether :func:`describe_failure` words ``exc``: bad files, I/O and resource limits, not bugs."""
    from safetensors import SafetensorError

    classes = (OSError, UnicodeError, json.JSONDecodeError, RecursionError, MemoryError, struct.error, EOFError,
               pickle.UnpicklingError, SafetensorError, _torch_oom())
    return isinstance(exc, classes) or _cpu_oom(exc)


def _cpu_oom(exc: BaseException) -> bool:
    """torch reports running out of CPU memory as a plain RuntimeError."""
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _torch_oom() -> type[BaseException]:
    import torch

    return getattr(torch, "OutOfMemoryError", MemoryError)


def describe_failure(exc: BaseException) -> str:
    """One line naming the problem and the fix for an exception of a :func:`foreseeable` class."""
    if isinstance(exc, json.JSONDecodeError):  # before OSError/ValueError: it is a ValueError
        return f"a JSON file is damaged ({exc.msg} at line {exc.lineno}): fix it or write it again"
    if isinstance(exc, OSError):
        return _os_error(exc)
    if isinstance(exc, UnicodeError):
        return f"a text file is not UTF-8 ({first_line(exc)}): save it as UTF-8"
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply to read: flatten it"
    if isinstance(exc, (MemoryError, _torch_oom())) or _cpu_oom(exc):
        return "out of memory: use a smaller model, fewer --samples or a shorter --seq-len, or a bigger machine"
    if isinstance(exc, pickle.UnpicklingError):
        return (f"refused to unpickle a checkpoint ({first_line(exc)}): pickles can run code; "
                "use safetensors weights from a source you trust")
    if isinstance(exc, (struct.error, EOFError)):
        return f"a file ends early or is corrupt ({first_line(exc)}): download or save it again"
    return f"cannot read a model file ({first_line(exc)}): it is damaged or incomplete; download or save it again"

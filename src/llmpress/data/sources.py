"""Text sources named by a spec string, e.g. ``austen:eval`` or ``text:notes.txt``.

One spec names one text; everything downstream (tokenization, calibration
samples, evaluation windows) works from that string, so the CLI, recipes and
reports all speak the same language. Spec forms are listed in ``SPEC_HELP``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from llmpress.data import austen
from llmpress.errors import LlmpressError, first_line

log = logging.getLogger(__name__)

SPEC_HELP = (
    "austen:calib|eval|eval2|<novel>, text:PATH, jsonl:PATH:FIELD, hf:NAME[:CONFIG[:SPLIT]]"
)


@dataclass(frozen=True)
class Spec:
    """A parsed spec: ``scheme`` plus the fields that scheme uses."""

    scheme: str
    name: str = ""  # austen split/novel, file path, or dataset name/path
    field: str = ""  # jsonl field
    config: str | None = None  # hf config
    split: str = "train"  # hf split


def parse_spec(spec: str) -> Spec:
    """Split a spec string into its parts; raise LlmpressError on a malformed one."""
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise LlmpressError(f"bad text spec {spec!r}; use one of: {SPEC_HELP}")
    if scheme == "austen":
        austen.resolve(rest)  # validates the name
        return Spec("austen", rest)
    if scheme == "text":
        return Spec("text", rest)
    if scheme == "jsonl":
        path, sep, field = rest.rpartition(":")
        if not sep or not path or not field:
            raise LlmpressError(f"bad jsonl spec {spec!r}; write jsonl:PATH:FIELD, e.g. jsonl:data.jsonl:text")
        return Spec("jsonl", path, field=field)
    if scheme == "hf":
        name, _, tail = rest.partition(":")
        config, _, split = tail.partition(":")
        return Spec("hf", name, config=config or None, split=split or "train")
    raise LlmpressError(f"unknown text source {scheme!r} in {spec!r}; use one of: {SPEC_HELP}")


def describe_spec(spec: str) -> str:
    """Short human description, e.g. ``Austen: Persuasion (held out)``."""
    s = parse_spec(spec)
    if s.scheme == "austen":
        return austen.describe(s.name)
    if s.scheme == "text":
        return f"text file {Path(s.name).name}"
    if s.scheme == "jsonl":
        return f"JSON lines {Path(s.name).name}, field {s.field!r}"
    config = f", config {s.config}" if s.config else ""
    return f"dataset {s.name}{config}, split {s.split}"


def load_text(spec: str, progress: bool = False) -> str:
    """The text a spec names.

    ``progress`` shows download progress bars for ``hf:`` datasets; the Austen
    corpus logs one line when it is fetched (once, then it is cached).
    """
    s = parse_spec(spec)
    if s.scheme == "austen":
        return austen.load(s.name)
    if s.scheme == "text":
        return _read(_existing(s.name, spec), spec, lambda p: p.read_text(encoding="utf-8"))
    if s.scheme == "jsonl":
        return _read(_existing(s.name, spec), spec, lambda p: _load_jsonl(p, s.field))
    return _load_hf(s, progress)


def _read(path: Path, spec: str, read) -> str:
    """``read(path)``, with a file that is not UTF-8 or cannot be read reported as one line."""
    try:
        return read(path)
    except UnicodeDecodeError as e:
        raise LlmpressError(f"{path} (from spec {spec!r}) is not UTF-8 text (byte {e.start}): "
                            "save it as UTF-8") from None
    except OSError as e:
        raise LlmpressError(f"cannot read {path} (from spec {spec!r}): {e.strerror or e}") from None


def _existing(path: str, spec: str) -> Path:
    p = Path(path).expanduser()
    if not _is_file(p):
        raise LlmpressError(f"text file not found: {path} (from spec {spec!r}); check the path")
    return p


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name the file system cannot hold (too long, a NUL byte)
        return False


def _load_jsonl(path: Path, field: str) -> str:
    """The string ``field`` of every record, records joined with a blank line."""
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmpressError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from e
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                keys = sorted(record) if isinstance(record, dict) else []
                raise LlmpressError(
                    f"{path}:{lineno} has no string field {field!r} (fields: {', '.join(keys) or 'none'}); "
                    f"use jsonl:{path}:FIELD with one of them"
                )
            texts.append(value)
    return "\n\n".join(texts)


def _load_hf(s: Spec, progress: bool) -> str:
    """A Hugging Face dataset split; its text column joined with blank lines (wikitext convention)."""
    try:
        import datasets
    except ImportError as e:
        raise LlmpressError("hf: text sources need the datasets package; pip install llmpress[hf]") from e
    local = _is_file(Path(s.name)) or Path(s.name).is_dir()
    was_enabled, unreachable = datasets.is_progress_bar_enabled(), None
    (datasets.enable_progress_bars if progress else datasets.disable_progress_bars)()
    try:
        with contextlib.nullcontext() if local else offline_if_unreachable() as unreachable:
            ds = datasets.load_dataset(s.name, s.config, split=s.split)
    except (OSError, ValueError) as e:
        if unreachable is not None:
            raise LlmpressError(f"cannot load dataset {s.name!r}: the Hugging Face hub is out of reach "
                                f"({unreachable}) and the dataset is not in the local cache; connect to the network, "
                                "or use text:PATH or jsonl:PATH:FIELD") from e
        raise LlmpressError(f"cannot load dataset {s.name!r} split {s.split!r}: {first_line(e)}") from e
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()
    return "\n\n".join(ds[_text_column(ds, s.name)])


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (one quick TCP connection), or None when it can be, or
    when offline mode is already on (HF_HUB_OFFLINE=1: then nothing is tried)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.is_offline_mode():
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}: {e.strerror or type(e).__name__}"
    return None


@contextlib.contextmanager
def offline_if_unreachable():
    """Yields why the hub is out of reach, with the hub libraries in offline mode meanwhile (as HF_HUB_OFFLINE=1
    would set them at import: the local cache in one try, not 5 retries over 31 s); or None, changing nothing."""
    reason = hub_unreachable()
    if reason is None:
        yield None
        return
    from huggingface_hub import constants

    modules = [constants] + [m for m in (sys.modules.get("datasets.config"),) if m is not None]
    saved = [m.HF_HUB_OFFLINE for m in modules]
    for m in modules:
        m.HF_HUB_OFFLINE = True
    try:
        yield reason
    finally:
        for m, value in zip(modules, saved):
            m.HF_HUB_OFFLINE = value


def _text_column(ds: object, name: str) -> str:
    """``text`` if present, else the only string column."""
    features = ds.features  # type: ignore[attr-defined]
    if "text" in features:
        return "text"
    strings = [k for k, v in features.items() if getattr(v, "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise LlmpressError(
        f"dataset {name!r} has no 'text' column and {len(strings)} string columns "
        f"({', '.join(features)}); save the text you want in a 'text' column or use jsonl:PATH:FIELD"
    )

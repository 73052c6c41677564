"""Jane Austen's six novels, the default offline corpus.

Debian's ``r-cran-janeaustenr`` package carries the novels inside R's
lazy-load database (``janeaustenr/data/Rdata.rdx`` + ``Rdata.rdb``). We fetch
the .deb with ``apt-get download`` (no R needed), unpack it with
``dpkg-deb -x``, read the container format with our own code and let the
``rdata`` package decode each R serialization. The novels are then cached as
plain UTF-8 files under ``cache_dir()/austen/<name>.txt`` so later calls are
instant and need neither apt nor the .deb.

Protocol: each novel is an R character vector with one element per printed
line (empty strings are blank lines); a novel's text is those elements
joined with ``"\\n"``. Several novels are joined with ``"\\n\\n"``.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from llmpress.errors import LlmpressError
from llmpress.paths import cache_dir, write_text_atomic

log = logging.getLogger(__name__)

DEB_PACKAGE = "r-cran-janeaustenr"
DEB_ENV = "LLMPRESS_JANEAUSTENR_DEB"  # optional: a .deb the user downloaded by hand
_DATA_DIR = "janeaustenr/data"

# short name -> (R object name, title)
NOVELS: dict[str, tuple[str, str]] = {
    "emma": ("emma", "Emma"),
    "mansfield": ("mansfieldpark", "Mansfield Park"),
    "sense": ("sensesensibility", "Sense and Sensibility"),
    "pride": ("prideprejudice", "Pride and Prejudice"),
    "persuasion": ("persuasion", "Persuasion"),
    "northanger": ("northangerabbey", "Northanger Abbey"),
}

# split name -> (novels, role shown by describe_spec)
SPLITS: dict[str, tuple[tuple[str, ...], str]] = {
    "calib": (("emma", "mansfield", "sense"), "calibration"),
    "eval": (("persuasion",), "held out"),
    "eval2": (("pride", "northanger"), "second held-out set"),
}


def valid_names() -> list[str]:
    """Every name accepted after ``austen:``: the splits, then the novels."""
    return [*SPLITS, *NOVELS]


def resolve(name: str) -> tuple[tuple[str, ...], str]:
    """Map a split or novel short name to (novel short names, role)."""
    if name in SPLITS:
        return SPLITS[name]
    if name in NOVELS:
        return (name,), "single novel"
    raise LlmpressError(
        f"unknown Austen text {name!r}; use one of: "
        + ", ".join(f"austen:{n}" for n in valid_names())
    )


def describe(name: str) -> str:
    """Short description, e.g. ``Austen: Persuasion (held out)``."""
    novels, role = resolve(name)
    titles = " + ".join(NOVELS[n][1] for n in novels)
    return f"Austen: {titles} ({role})"


def load(name: str) -> str:
    """Text of a split or a single novel (novels joined with a blank line)."""
    novels, _ = resolve(name)
    return "\n\n".join(novel_text(n) for n in novels)


def novel_text(short: str) -> str:
    """One novel's text, fetching and caching the corpus on first use."""
    r_name = NOVELS[short][0]
    path = corpus_dir() / f"{r_name}.txt"
    if not path.is_file():
        fetch_corpus()
    return path.read_text(encoding="utf-8")


def corpus_dir() -> Path:
    return cache_dir() / "austen"


def fetch_corpus() -> Path:
    """Download, unpack and decode the six novels into :func:`corpus_dir`."""
    out = corpus_dir()
    log.info("fetching Jane Austen corpus (Debian %s) into %s", DEB_PACKAGE, out)
    with tempfile.TemporaryDirectory(prefix="llmpress-austen-") as tmp:
        deb = _download_deb(Path(tmp))
        root = Path(tmp) / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)], "unpack the .deb")
        data = _find_data_dir(root)
        objects = read_lazyload(data / "Rdata.rdx", data / "Rdata.rdb")
    out.mkdir(parents=True, exist_ok=True)
    for r_name, _title in NOVELS.values():
        if r_name not in objects:
            raise LlmpressError(f"{DEB_PACKAGE} has no object {r_name!r}; found {sorted(objects)}")
        write_text_atomic(out / f"{r_name}.txt", lines_to_text(objects[r_name]))
    log.info("cached %d novels in %s", len(NOVELS), out)
    return out


def lines_to_text(lines: object) -> str:
    """Join an R character vector (one element per line, NA as blank) with newlines."""
    return "\n".join("" if s is None else str(s) for s in lines)  # type: ignore[attr-defined]


# --- fetching ---------------------------------------------------------------


def _download_deb(tmp: Path) -> Path:
    """The package's .deb in ``tmp``: from $LLMPRESS_JANEAUSTENR_DEB or apt-get download."""
    if env := os.environ.get(DEB_ENV):
        if not Path(env).is_file():
            raise LlmpressError(f"${DEB_ENV}={env} is not a file; point it at {DEB_PACKAGE}_*.deb")
        return Path(env)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise LlmpressError(_fix_hint("apt-get/dpkg-deb not found"))
    result = _apt_download(tmp)
    if result.returncode != 0 and "locate package" in result.stderr and _is_root():
        log.info("apt-get cannot locate %s; running apt-get update once", DEB_PACKAGE)
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, check=False)
        result = _apt_download(tmp)
    debs = sorted(tmp.glob(f"{DEB_PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        reason = (result.stderr.strip().splitlines() or ["no .deb written"])[-1]
        raise LlmpressError(_fix_hint(f"apt-get download {DEB_PACKAGE} failed ({reason})"))
    return debs[0]


def _apt_download(tmp: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["apt-get", "download", DEB_PACKAGE]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False)


def _fix_hint(problem: str) -> str:
    return (
        f"cannot fetch the Austen corpus: {problem}; on Debian/Ubuntu run "
        f"'sudo apt-get update', or download {DEB_PACKAGE}_*.deb by hand and set ${DEB_ENV} to it"
    )


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LlmpressError(f"could not {what}: {' '.join(cmd)} said {result.stderr.strip()!r}")


def _find_data_dir(root: Path) -> Path:
    for rdx in root.rglob("Rdata.rdx"):
        if rdx.parent.as_posix().endswith(_DATA_DIR) and rdx.with_suffix(".rdb").is_file():
            return rdx.parent
    raise LlmpressError(f"{DEB_PACKAGE} .deb holds no {_DATA_DIR}/Rdata.rdx; is it the right package?")


# --- R lazy-load database ---------------------------------------------------


def read_lazyload(rdx: Path, rdb: Path) -> dict[str, object]:
    """Decode every object in an R lazy-load database (``.rdx`` index + ``.rdb`` blobs)."""
    index = _decode_r(_decompress_index(rdx.read_bytes()))
    variables = index["variables"]
    compressed = _compression_kind(index.get("compressed", True))
    blob_file = rdb.read_bytes()
    objects = {}
    for name, (offset, length) in variables.items():
        blob = blob_file[int(offset) : int(offset) + int(length)]
        objects[str(name)] = _decode_r(_decompress_blob(blob, compressed))
    return objects


def _decompress_index(raw: bytes) -> bytes:
    """The .rdx is gzip (R's saveRDS) or a 4-byte length header plus a zlib stream."""
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    return _zlib_with_length(raw)


def _compression_kind(flag: object) -> int:
    """R stores ``compressed`` as TRUE (zlib) or 2/3 (bzip2/xz, with a type byte)."""
    value = flag[0] if hasattr(flag, "__len__") else flag  # type: ignore[index]
    return 1 if value is True or value == 1 else int(value)  # type: ignore[arg-type]


def _decompress_blob(blob: bytes, kind: int) -> bytes:
    if kind == 0:
        return blob
    if kind == 1:
        return _zlib_with_length(blob)
    (size,), method, body = struct.unpack(">I", blob[:4]), blob[4:5], blob[5:]
    decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
    if method not in decoders:
        raise LlmpressError(f"unknown R lazy-load compression type {method!r}")
    return _checked(decoders[method](body), size)


def _zlib_with_length(blob: bytes) -> bytes:
    (size,) = struct.unpack(">I", blob[:4])
    return _checked(zlib.decompress(blob[4:]), size)


def _checked(data: bytes, size: int) -> bytes:
    if len(data) != size:
        raise LlmpressError(f"corrupt R lazy-load blob: {len(data)} bytes, header says {size}")
    return data


def _decode_r(serialized: bytes) -> object:
    """One R serialization (as saveRDS writes) to Python via the ``rdata`` package."""
    from rdata.conversion import convert
    from rdata.parser import parse_data

    return convert(parse_data(serialized, extension=".rds"))

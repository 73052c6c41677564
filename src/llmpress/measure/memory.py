"""Peak memory of a block of code.

On CUDA the allocator's own peak counter is exact. On CPU there is no such
counter for the current process that can be reset, so a background thread
samples the resident set size every few milliseconds; very short spikes
between samples can be missed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def return_free_memory() -> None:
    """Ask glibc to give freed heap pages back to the OS, so RSS reflects live memory.

    Without this, memory freed earlier stays resident and a new allocation that
    reuses it never shows up as a rise in RSS.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_memory() -> int:
    """Bytes of memory the system can give a process now (``MemAvailable``, what psutil reports on Linux;
    elsewhere the free pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def current_rss() -> int:
    """Resident set size of this process in bytes.

    Reads ``/proc/self/statm``; where that is missing falls back to
    ``getrusage`` (which reports the lifetime peak, not the current value).
    """
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Context manager recording peak memory inside its block.

    ``peak_bytes``: the absolute peak (process RSS on CPU, allocated tensor
    bytes on CUDA); ``delta_bytes``: peak minus the value at entry. Both are
    ``None`` until the block exits.
    """

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.start_bytes: int | None = None
        self.peak_bytes: int | None = None
        self.delta_bytes: int | None = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        """Background loop: keep the largest RSS seen until told to stop."""
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, current_rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return self
        return_free_memory()
        self.start_bytes = self._peak = current_rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="llmpress-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            final = current_rss()
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            self.peak_bytes = max(self._peak, final)
        self.delta_bytes = max(0, self.peak_bytes - self.start_bytes)
        log.debug("peak memory %d bytes (+%d)", self.peak_bytes, self.delta_bytes)
        return False

    def so_far(self) -> int:
        """The peak up to now, inside the block (what ``peak_bytes`` would be if it ended here)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(self._peak, current_rss())

    def as_dict(self) -> dict:
        """JSON-able summary for a report row."""
        return {"peak_bytes": self.peak_bytes, "delta_bytes": self.delta_bytes, "device": str(self.device)}

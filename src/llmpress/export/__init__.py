"""Storage formats: one table (:mod:`.formats`) of how a compressed model is written and read back
(dense, compressed-tensors pack-quantized / int-quantized / sparse, llmpress low-rank), one module
per format, and which tools can read what was written (:func:`readers`).

Names are imported on first use, so that ``llmpress.export.reading`` (which the CLI's loader imports)
stays light.
"""

from importlib import import_module

_EXPORTS = {"FORMATS": "formats", "folder_format": "formats", "readers": "formats",
            "save_compressed_tensors": "compressed_tensors"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'llmpress.export' has no attribute {name!r}")

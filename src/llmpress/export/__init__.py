"""Exporters: write a compressed model in a deployment format (compressed-tensors for transformers/vLLM),
and say which tools can read what was written (:func:`readers`)."""

from .compressed_tensors import save_compressed_tensors
from .readers import folder_format, readers

__all__ = ["folder_format", "readers", "save_compressed_tensors"]

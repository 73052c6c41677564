"""Exporters: write a compressed model in a deployment format (compressed-tensors for transformers/vLLM)."""

from .compressed_tensors import save_compressed_tensors

__all__ = ["save_compressed_tensors"]

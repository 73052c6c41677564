"""Low-rank factorization of linear layers: plain SVD, ASVD and SVD-LLM, with global rank allocation.

Pure functions on tensors in :mod:`.factorize` and :mod:`.allocate`; the factorized
layer and its storage in :mod:`.module`; the model-level stages in :mod:`.stage`.
"""

from .allocate import allocate_ranks, break_even
from .factorize import Factorized, asvd_factorize, svd_factorize, svd_llm_factorize
from .module import LowRankLinear, densify
from .stage import ASVDConfig, SVDConfig, SVDLLMConfig

__all__ = ["ASVDConfig", "Factorized", "LowRankLinear", "SVDConfig", "SVDLLMConfig", "allocate_ranks",
           "asvd_factorize", "break_even", "densify", "svd_factorize", "svd_llm_factorize"]

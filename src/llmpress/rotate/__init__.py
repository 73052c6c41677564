"""Rotations that keep a model's function and spread its outliers (QuaRot, SpinQuant).

Pure matrices in :mod:`.hadamard`; the folds and rotations of a model's weights in :mod:`.fold`; the
``rotate`` stage (config, registration, recipe) in :mod:`.stage`; QuaRot's run-time transforms in :mod:`.online`;
SpinQuant's learned residual rotation (the ``spinquant`` stage, Cayley SGD) in :mod:`.spin`.
"""

from .fold import fold_norms, rotate_heads, rotate_residual, untie_head, why_not
from .hadamard import hadamard, has_hadamard, random_hadamard, random_orthogonal, rotation
from .stage import RotateConfig, rotate_model

__all__ = ["RotateConfig", "fold_norms", "hadamard", "has_hadamard", "random_hadamard", "random_orthogonal",
           "rotate_heads", "rotate_model", "rotate_residual", "rotation", "untie_head", "why_not"]

"""What a compression method returns for one weight matrix.

Every method is a pure function ``(weight, statistics..., config) ->
Compressed``. The engine writes ``weight`` back into the model; saving and
size accounting read the rest (integer codes, scales, masks, metadata).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Compressed:
    """Result of compressing one (out, in) weight.

    weight: the tensor the model computes with from now on (fp32, (out, in));
        None in the copies the engine keeps for export.
    qweight/scale/zero: integer codes (int8, (out, in)) and per-group scale
        and zero point ((out, groups)) when the weight was quantized.
    mask: bool (out, in), True where a weight was kept, when it was pruned.
    meta: what size accounting needs: {"method", "bits", "group_size",
        "sym", "sparsity", ...}; JSON-serialisable.
    loss: the method's own error estimate, when it has one.
    """

    weight: Tensor | None
    qweight: Tensor | None = None
    scale: Tensor | None = None
    zero: Tensor | None = None
    mask: Tensor | None = None
    meta: dict = field(default_factory=dict)
    loss: float | None = None


def is_two_four(nm, in_features: int) -> bool:
    """Whether a layer with N:M pattern ``nm`` ([n, m] or None) and ``in_features`` columns is 2:4 over
    whole groups of 4: what compressed-tensors' sparse-24-bitmask layout stores (``export.sparse``),
    with no row offsets (``measure.size``)."""
    return nm is not None and list(nm) == [2, 4] and in_features % 4 == 0

"""What a compression method returns for one weight matrix, and the typed record of what was done to it.

Every method is a pure function ``(weight, statistics..., config) ->
Compressed``. The engine writes ``weight`` back into the model; saving and
size accounting read the rest (integer codes, scales, masks) and the typed
:class:`Grid` and :class:`Sparsity`. A layer's record in ``llmpress.json``
(``layers``) is JSON; :meth:`Grid.of` and :meth:`Sparsity.of` are the one place
that knows its keys (``bits``, ``group_size``, ``sym``, ``zero_float``,
``act_bits``, ``kquant``, ``codebook``, ``vq_dim``/``vq_rows``; ``sparsity``, ``n:m``), so size
accounting, FLOPs, the exporters and QAT read fields, never keys.

Per channel is spelled ``group_size = -1`` in configs, recipes, records and
:class:`Grid`; ``Grid.group`` gives the ``None`` that ``llmpress.primitives``
takes for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class Compressed:
    """Result of compressing one (out, in) weight.

    weight: the tensor the model computes with from now on (fp32, (out, in));
        None in the copies the engine keeps for export.
    qweight/scale/zero: integer codes (int8, (out, in)) and per-group scale
        and zero point ((out, groups)) when the weight was quantized.
    mask: bool (out, in), True where a weight was kept, when it was pruned.
    codebook: the lookup table (out, 2^bits) of a non-uniform grid (``Grid.codebook``), one sorted row
        of values per output row; qweight then holds indices 0..2^bits-1 into it (uint8) and scale/zero are None.
        A vector grid (``Grid.vector`` = (dim, rows)): codebooks (ceil(out/rows), 2^(bits·dim), dim) and
        qweight (out, in/dim) indices into them.
    grid: the grid of qweight/scale/zero, when the weight was quantized.
    sparsity: the measured fraction of zeros and N:M pattern, when it was pruned.
    meta: the method's own record ({"method", ...}, JSON-serialisable); the
        layer's record is ``record()``: meta plus the grid's and sparsity's keys.
    loss: the method's own error estimate, when it has one.
    """

    weight: Tensor | None
    qweight: Tensor | None = None
    scale: Tensor | None = None
    zero: Tensor | None = None
    mask: Tensor | None = None
    meta: dict = field(default_factory=dict)
    loss: float | None = None
    grid: Grid | None = None
    sparsity: Sparsity | None = None
    codebook: Tensor | None = None

    def record(self) -> dict[str, Any]:
        """The layer's JSON record: the method's meta, then the grid's and the sparsity's keys."""
        out = dict(self.meta)
        if self.sparsity is not None:
            out.update(self.sparsity.to_record())
        if self.grid is not None:
            out.update(self.grid.to_record())
        return out


@dataclass(frozen=True)
class Grid:
    """An integer weight grid: ``bits``-bit codes, one scale (and zero point unless ``sym``) per ``group_size``
    consecutive inputs of a row (-1: one per output channel); ``float_zero``: the zero points are floats
    (HQQ), which compressed-tensors cannot pack; ``act_bits``: activations are quantized too (W8A8, per
    token, dynamic); ``kquant``: the scales (and offsets) are themselves quantized against one fp16 scale per
    super-block of 256 inputs, llama.cpp's K-quants ("Q4_K": 4-bit groups of 32 with float zero points,
    "Q6_K": symmetric 6-bit groups of 16; ``llmpress.primitives.kquant_qparams``); ``codebook``: a
    non-uniform grid, each ``bits``-bit code an index into a lookup table of 2^bits fp16 values per
    ``group_size`` inputs of a row (-1: one table per row; SqueezeLLM, ``llmpress.quant.squeezellm``), no
    scales or zero points; ``vector``: (dim, rows) for a vector-quantized codebook grid (GPTVQ,
    ``llmpress.quant.vq``): each code of bits·dim bits picks one of 2^(bits·dim) dim-long codewords, one
    codebook per ``rows`` consecutive output rows."""

    bits: int
    group_size: int = -1
    sym: bool = True
    float_zero: bool = False
    act_bits: int | None = None
    kquant: str | None = None
    codebook: bool = False
    vector: tuple[int, int] | None = None

    @property
    def group(self) -> int | None:
        """The group size as ``llmpress.primitives`` takes it (None = per channel)."""
        return None if self.group_size == -1 else self.group_size

    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        if self.float_zero:
            out["zero_float"] = True
        if self.act_bits is not None:
            out["act_bits"] = self.act_bits
        if self.kquant is not None:
            out["kquant"] = self.kquant
        if self.codebook:
            out["codebook"] = True
        if self.vector is not None:
            out["vq_dim"], out["vq_rows"] = self.vector
        return out

    @classmethod
    def of(cls, record: dict | None) -> Grid | None:
        """The grid a layer record describes; None when the layer was not quantized."""
        if not record or record.get("bits") is None:
            return None
        group = record.get("group_size")
        return cls(int(record["bits"]), -1 if group is None else int(group), bool(record.get("sym", True)),
                   bool(record.get("zero_float", False)),
                   None if record.get("act_bits") is None else int(record["act_bits"]),
                   None if record.get("kquant") is None else str(record["kquant"]),
                   bool(record.get("codebook", False)),
                   None if record.get("vq_dim") is None else (int(record["vq_dim"]), int(record["vq_rows"])))


@dataclass(frozen=True)
class Sparsity:
    """The measured fraction of zeros of a pruned weight and its N:M pattern (None: unstructured)."""

    fraction: float
    nm: tuple[int, int] | None = None

    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sparsity": self.fraction}
        if self.nm is not None:
            out["n:m"] = list(self.nm)
        return out

    @classmethod
    def of(cls, record: dict | None) -> Sparsity | None:
        """The sparsity a layer record describes; None when the layer was not pruned."""
        if not record or (not record.get("sparsity") and record.get("n:m") is None):
            return None
        nm = None if record.get("n:m") is None else (int(record["n:m"][0]), int(record["n:m"][1]))
        fraction = float(record["sparsity"]) if record.get("sparsity") else 1 - nm[0] / nm[1]
        return cls(fraction, nm)

    def two_four(self, in_features: int) -> bool:
        """Stored as compressed-tensors' sparse-24-bitmask: 2:4 over whole groups of 4 (see :func:`is_two_four`)."""
        return is_two_four(self.nm, in_features)


def is_two_four(nm, in_features: int) -> bool:
    """Whether a layer with N:M pattern ``nm`` ([n, m] or None) and ``in_features`` columns is 2:4 over
    whole groups of 4: what compressed-tensors' sparse-24-bitmask layout stores (``export.sparse``),
    with no row offsets (``measure.size``)."""
    return nm is not None and list(nm) == [2, 4] and in_features % 4 == 0

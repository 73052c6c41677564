"""Pack signed low-bit integer codes densely into int32 words, and back (pure tensor functions).

The layout is compressed-tensors' ``pack-quantized`` format (0.20), which
vLLM and transformers read: a ``bits``-bit code ``q`` in the signed range
[-2^(b-1), 2^(b-1)-1] is stored as the unsigned value ``q + 2^(b-1)``; the
codes of a row form one little-endian bit stream, code ``i`` occupying bits
``i*b .. i*b+b-1`` (bit ``k`` of the stream is bit ``k % 32`` of word
``k // 32``), so a code may straddle two words when 32 is not a multiple
of ``b``. A row of ``n`` codes takes ``ceil(n*b/32)`` words; the unused
high bits of the last word are zero. Words are int32 (the top bit wraps to
the sign). For ``b`` in {2, 4, 8} this is the familiar "32/b codes per
word, lowest code in the lowest bits"; for 3, 5, 6 and 7 bits the dense
cross-word layout is compressed-tensors 0.20's (its docstring: "32
consecutive elements are packed into exactly num_bits int32 words"), and
readers that assume 32//b codes per word will not read it.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor

from ..config import Check, check_value
from ..errors import LlmpressError

_WORD = 32


def packed_width(columns: int, bits: int) -> int:
    """int32 words per row for ``columns`` codes of ``bits`` bits."""
    return math.ceil(columns * bits / _WORD)


def _check_bits(bits: int) -> None:
    try:
        check_value("bits", bits, Annotated[int, Check(ge=1, le=8)])
    except LlmpressError:
        raise LlmpressError(f"bits={bits!r} cannot be packed: use an integer from 1 to 8") from None


def pack_int(q: Tensor, bits: int) -> Tensor:
    """Pack int8 codes ``q`` (rows, n) into int32 words (rows, ceil(n*bits/32)) along the last dim.

    Every 32 consecutive codes fill exactly ``bits`` words, so each row is
    processed in blocks of 32 codes (zero-padded at the end).
    """
    _check_bits(bits)
    if q.dtype != torch.int8 or q.dim() != 2:
        raise LlmpressError(f"pack_int needs a 2-D int8 tensor of codes, got {q.dtype} {tuple(q.shape)}: "
                            "quantize to int8 codes first")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise LlmpressError(f"codes outside the {bits}-bit range [{lo}, {hi}]: quantize with bits={bits}")
    rows, cols = q.shape
    blocks = math.ceil(cols / _WORD)
    unsigned = q.to(torch.int32) + (1 << (bits - 1))
    unsigned = torch.nn.functional.pad(unsigned, (0, blocks * _WORD - cols))
    words = torch.zeros(rows, blocks * bits, dtype=torch.int32, device=q.device)
    # int32 shifts wrap like the unsigned words they stand for; bits never overlap, so | is exact.
    for i, (word, offset) in enumerate(_layout(bits)):
        code = unsigned[:, i::_WORD]
        words[:, word::bits] |= code << offset
        if offset + bits > _WORD:
            words[:, word + 1::bits] |= code >> (_WORD - offset)
    return words[:, :packed_width(cols, bits)].contiguous()


def _layout(bits: int) -> list[tuple[int, int]]:
    """For the 32 codes of a block of ``bits`` words: the word each starts in and its bit offset."""
    return [divmod(i * bits, _WORD) for i in range(_WORD)]


def unpack_int(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """Inverse of :func:`pack_int`: int32 words (rows, w) -> int8 codes (rows, in_features)."""
    _check_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise LlmpressError(f"unpack_int needs a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_width(in_features, bits):
        raise LlmpressError(f"{packed.shape[1]} words per row cannot hold {in_features} codes of {bits} bits "
                            f"(expected {packed_width(in_features, bits)}): check bits and the weight shape")
    rows = packed.shape[0]
    blocks = math.ceil(in_features / _WORD)
    words = torch.nn.functional.pad(packed, (0, blocks * bits - packed.shape[1]))
    codes = torch.empty(rows, blocks * _WORD, dtype=torch.int32, device=packed.device)
    for i, (word, offset) in enumerate(_layout(bits)):
        low = min(bits, _WORD - offset)  # bits of this code in its first word
        code = (words[:, word::bits] >> offset) & ((1 << low) - 1)  # the mask drops sign extension
        if low < bits:
            code |= (words[:, word + 1::bits] & ((1 << (bits - low)) - 1)) << low
        codes[:, i::_WORD] = code
    return (codes[:, :in_features] - (1 << (bits - 1))).to(torch.int8)

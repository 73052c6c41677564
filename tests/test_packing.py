"""Dense int32 packing: exact round trips, a plain big-integer reference, and compressed-tensors' own packer."""

import pytest
import torch

from llmpress.errors import LlmpressError
from llmpress.quant.packing import pack_int, packed_width, unpack_int

WIDTHS = [1, 5, 31, 32, 33, 96, 100, 576]


def random_codes(rows, cols, bits, seed=0):
    generator = torch.Generator().manual_seed(seed * 100 + bits * 7 + cols)
    return torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (rows, cols), generator=generator, dtype=torch.int8)


def reference_pack(q, bits):
    """Each row as one Python integer: code i (offset to unsigned) at bit i*bits; cut into signed 32-bit words."""
    words = packed_width(q.shape[1], bits)
    out = torch.empty(q.shape[0], words, dtype=torch.int32)
    for r, row in enumerate(q.tolist()):
        stream = sum((v + 2 ** (bits - 1)) << (i * bits) for i, v in enumerate(row))
        for w in range(words):
            word = (stream >> (32 * w)) & 0xFFFFFFFF
            out[r, w] = word - 2 ** 32 if word >= 2 ** 31 else word
    return out


@pytest.mark.parametrize("bits", range(2, 9))
def test_round_trip_is_exact_for_every_width(bits):
    for cols in WIDTHS:
        q = random_codes(6, cols, bits)
        packed = pack_int(q, bits)
        assert packed.dtype == torch.int32 and packed.shape == (6, -(-cols * bits // 32))
        assert torch.equal(unpack_int(packed, bits, cols), q)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_pack_equals_big_integer_reference(bits):
    for cols in (1, 33, 100):
        q = random_codes(3, cols, bits, seed=1)
        assert torch.equal(pack_int(q, bits), reference_pack(q, bits))


def test_extreme_codes_set_the_sign_bit_and_survive():
    q = torch.full((2, 64), 7, dtype=torch.int8)  # unsigned 15: every nibble set, so every word is -1
    assert torch.equal(pack_int(q, 4), torch.full((2, 8), -1, dtype=torch.int32))
    q[1] = -8  # unsigned 0
    assert torch.equal(unpack_int(pack_int(q, 4), 4, 64), q)


def test_four_bit_nibble_order():
    q = torch.arange(-8, 8, dtype=torch.int8).reshape(2, 8)  # unsigned 0..7 and 8..15
    words = pack_int(q, 4)
    assert words[0, 0].item() == 0x76543210  # lowest code in the lowest nibble
    assert words[1, 0].item() == 0xFEDCBA98 - 2 ** 32


@pytest.mark.parametrize("bits", range(1, 9))
def test_equals_compressed_tensors_packing(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for cols in WIDTHS:
        q = random_codes(5, cols, bits, seed=2)
        packed = pack_int(q, bits)
        assert torch.equal(packed, helpers.pack_to_int32(q, bits))
        assert torch.equal(helpers.unpack_from_int32(packed, bits, q.shape), q)
    # zero points are packed along the output dim: the transpose of the same layout
    z = random_codes(40, 3, bits, seed=3)
    ours = pack_int(z.t().contiguous(), bits).t()
    assert torch.equal(ours, helpers.pack_to_int32(z, bits, packed_dim=0))


@pytest.mark.parametrize("call, needle", [
    (lambda: pack_int(torch.zeros(2, 4, dtype=torch.int32), 4), "2-D int8"),
    (lambda: pack_int(torch.full((2, 4), 8, dtype=torch.int8), 4), r"outside the 4-bit range \[-8, 7\]"),
    (lambda: pack_int(torch.zeros(2, 4, dtype=torch.int8), 9), "bits=9 cannot be packed"),
    (lambda: unpack_int(torch.zeros(2, 3, dtype=torch.int32), 4, 64), "3 words per row cannot hold 64"),
])
def test_bad_input_is_reported(call, needle):
    with pytest.raises(LlmpressError, match=needle):
        call()

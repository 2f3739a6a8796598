"""Bit packing: exact round trip and the byte count the memory formula relies on."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvq.quant.packing import pack_codes, packed_nbytes, unpack_codes


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 3000), seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_exact(bits: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(n, bits) == -(-n // 8) * bits
    out = unpack_codes(packed, bits, n)
    assert out.dtype == torch.uint8 and torch.equal(out.long(), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_several_codes_per_byte(bits: int) -> None:
    codes = torch.full((800,), 2**bits - 1)
    assert pack_codes(codes, bits).numel() == 100 * bits  # 800 codes * bits / 8


def test_extreme_codes_survive() -> None:
    for bits in range(1, 9):
        codes = torch.tensor([0, 2**bits - 1] * 13)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 26).long(), codes)


def test_wrong_buffer_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 8)

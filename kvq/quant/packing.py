"""Bit packing of integer codes: several b-bit codes per byte, exact round trip.

Layout: the flat code vector is padded to a multiple of 8 codes; every run of 8 codes
becomes ``bits`` bytes. The packed size is therefore ``ceil(n / 8) * bits`` bytes for any
``bits`` in 1..8, the number :func:`packed_nbytes` returns and :mod:`kvq.memory` counts.
Widths that divide 8 (1, 2, 4, 8) use a shift-and-or fast path; 3, 5, 6, 7 go through
bit planes.
"""

from __future__ import annotations

import torch

__all__ = ["packed_nbytes", "pack_codes", "unpack_codes"]

_FAST = (1, 2, 4, 8)


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes used by :func:`pack_codes` for ``n`` codes of ``bits`` bits."""
    return -(-n // 8) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes into bytes.

    Args:
        codes: integer tensor of any shape with values in ``[0, 2**bits)``; flattened.
        bits: code width, 1..8.

    Returns:
        uint8 tensor of shape ``[packed_nbytes(codes.numel(), bits)]``.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if bits == 8:
        return flat
    if bits in _FAST:  # byte arithmetic: code j of a byte goes to bits [j * bits, (j + 1) * bits)
        x = flat.view(-1, 8 // bits)
        out = x[:, 0].clone()
        for j in range(1, 8 // bits):
            out |= x[:, j] << (j * bits)
        return out
    x = flat.view(-1, 8).to(torch.int32)
    planes = (x.unsqueeze(-1) >> torch.arange(bits, device=flat.device, dtype=torch.int32)) & 1
    planes = planes.reshape(-1, bits, 8)  # [M, 8 codes * bits] regrouped as bytes of 8 bits
    weights = torch.arange(8, device=flat.device, dtype=torch.int32)
    return (planes << weights).sum(dim=-1).reshape(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        packed: uint8 tensor from :func:`pack_codes`.
        bits: code width used when packing.
        n: number of codes packed.

    Returns:
        uint8 tensor of shape ``[n]`` (every code fits: ``bits <= 8``).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"packed buffer holds {packed.numel()} bytes, expected {packed_nbytes(n, bits)}")
    if bits == 8:
        return packed[:n]
    if bits in _FAST:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        out = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return out.reshape(-1)[:n]
    p = packed.to(torch.int32)
    bytes_ = p.view(-1, bits)
    planes = (bytes_.unsqueeze(-1) >> torch.arange(8, device=packed.device, dtype=torch.int32)) & 1
    planes = planes.reshape(-1, 8, bits)  # [M, 8 codes, bits]
    weights = torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (planes << weights).sum(dim=-1).reshape(-1)[:n].to(torch.uint8)

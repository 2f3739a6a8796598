"""The ``rotation`` axis: an orthogonal transform of each head's features around any quantizer.

A cache with a rotation quantizes ``rotate(x)`` and hands back ``unrotate(decode(...))``
(:attr:`kvq.cache.KVQuantSpec.rotation`): keys after RoPE (before it with ``kv.pre_rope``) and
values, as ``[B, H_kv, t, head_dim]``, one transform per layer and kind. Nothing is stored: the
transform is a function of the seed, so a rotation costs no bits.

:class:`HadamardRotation` is QuaRot's / SpinQuant's randomized Hadamard transform
``R = H_d diag(s) / sqrt(d)`` with seeded random signs ``s`` (one sign vector per layer and kind).
It spreads a few outlier channels over all of them, so every per-token group becomes near-Gaussian
with a smaller range. ``H_d`` is applied as a fast Walsh-Hadamard transform (``O(d log d)``).

Head dims that are not powers of two: ``d = 2**k * m`` with ``m`` odd is handled as the
Kronecker product ``Q_m (x) H_{2**k}`` -- the features viewed as ``[m, 2**k]``, a Walsh-Hadamard
transform along the ``2**k`` axis and a seeded random orthogonal ``m x m`` matrix (QR of a Gaussian)
along the other. The product of orthogonal factors is orthogonal, it still mixes every feature
with every other, and costs ``O(d (log d + m))`` (``d = 80 = 5 * 16``, ``96 = 3 * 32``,
``120 = 15 * 8``). An odd ``d`` is a dense random orthogonal matrix.

The transform is computed in float32 (``rotate`` returns float32, ``unrotate`` the dtype it was
given), so ``unrotate(rotate(x))`` equals ``x`` up to float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

__all__ = ["HadamardRotation", "NoRotation", "Rotation", "fwht", "random_orthogonal"]

_KIND_ID = {"key": 0, "value": 1}


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform along the last axis (its own inverse).

    Args:
        x: ``[..., n]`` with ``n`` a power of two.

    Returns:
        ``H_n x / sqrt(n)``, same shape and dtype (Sylvester order: ``H_2n = [[H, H], [H, -H]]``).
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).view(-1, n)
        h *= 2
    return (y * (1.0 / math.sqrt(n))).view(*lead, n)


def random_orthogonal(m: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal ``[m, m]`` float32 matrix (Haar: QR of a Gaussian, signs fixed)."""
    a = torch.randn(m, m, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.float()


@dataclass
class Rotation:
    """Base of the ``rotation`` options: the identity (``rotation=none``).

    Subclasses implement :meth:`rotate` and :meth:`unrotate`, exact inverses of each other.
    """

    name: ClassVar[str] = "none"
    #: whether this option changes anything (``False`` only for the identity)
    rotates: ClassVar[bool] = False

    def rotate(self, x: torch.Tensor, layer_idx: int, kind: str) -> torch.Tensor:
        """``x`` ``[B, H, t, d]`` in the rotated basis (here: unchanged)."""
        return x

    def unrotate(self, x: torch.Tensor, layer_idx: int, kind: str) -> torch.Tensor:
        """Inverse of :meth:`rotate` on ``[B, H, t, d]``."""
        return x


@dataclass
class NoRotation(Rotation):
    """``rotation=none``: K/V are quantized in their own basis."""


@dataclass
class HadamardRotation(Rotation):
    """``rotation=hadamard``: a seeded randomized Hadamard transform of each head's features.

    Args:
        seed: seeds the random signs (and the odd-factor orthogonal matrix) of every layer and kind.
        keys: rotate keys.
        values: rotate values.
    """

    seed: int = 0
    keys: bool = True
    values: bool = True

    name: ClassVar[str] = "hadamard"
    rotates: ClassVar[bool] = True

    _factors: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor | None]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def applies(self, kind: str) -> bool:
        """Whether ``kind`` (``key``/``value``) is rotated."""
        return self.keys if kind == "key" else self.values

    def factors(self, layer_idx: int, kind: str, d: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(signs [d], Q [m, m] or None)`` of one layer and kind (float32, CPU, cached).

        The generator is seeded from ``(seed, layer, kind)`` alone, so a transform never depends
        on the order in which layers are met.
        """
        key = (layer_idx, kind, d)
        if key not in self._factors:
            g = torch.Generator().manual_seed(
                (int(self.seed) * 1_000_003 + (layer_idx + 1) * 7919 + _KIND_ID[kind]) % (2**63 - 1)
            )
            signs = torch.randint(0, 2, (d,), generator=g).float() * 2 - 1
            m = d // (d & -d)  # the odd factor of d
            self._factors[key] = (signs, random_orthogonal(m, g) if m > 1 else None)
        return self._factors[key]

    def _mix(self, y: torch.Tensor, q: torch.Tensor | None, inverse: bool) -> torch.Tensor:
        """``(Q (x) H) y`` (or its transpose) on the last axis of float32 ``y``."""
        d = y.shape[-1]
        p = d & -d
        if q is None:
            return fwht(y)
        m = d // p
        z = y.reshape(*y.shape[:-1], m, p)
        if p > 1:
            z = fwht(z)
        qq = q.to(z.device)
        z = torch.matmul(qq.t() if inverse else qq, z)  # [m, m] @ [..., m, p]
        return z.reshape(y.shape)

    def rotate(self, x: torch.Tensor, layer_idx: int, kind: str) -> torch.Tensor:
        """``R x`` per head: ``[B, H, t, d]`` -> float32 ``[B, H, t, d]``."""
        if not self.applies(kind):
            return x
        signs, q = self.factors(layer_idx, kind, x.shape[-1])
        return self._mix(x.float() * signs.to(x.device), q, inverse=False)

    def unrotate(self, x: torch.Tensor, layer_idx: int, kind: str) -> torch.Tensor:
        """``R^T x`` per head: ``[B, H, t, d]`` -> ``[B, H, t, d]`` in ``x``'s dtype."""
        if not self.applies(kind):
            return x
        signs, q = self.factors(layer_idx, kind, x.shape[-1])
        return (self._mix(x.float(), q, inverse=True) * signs.to(x.device)).to(x.dtype)

    def matrix(self, layer_idx: int, kind: str, d: int) -> torch.Tensor:
        """The ``[d, d]`` matrix ``R`` (``rotate`` maps a row ``x`` to ``x @ R.T``); for tests."""
        return self.rotate(torch.eye(d).view(1, 1, d, d), layer_idx, kind).view(d, d).t()

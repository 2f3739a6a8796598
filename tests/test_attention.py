"""The kvq attention against a float64 reference: mixing, softcap, pad rows, windows, block sizes."""

from __future__ import annotations

import math

import pytest
import torch

from kvq import attention
from kvq.attention import MixedKV, blockwise_attention


def reference(q, kq, vq, kf, vf, M, mask, scaling, softcap=None) -> torch.Tensor:
    """Full-matrix attention in float64: query t sees key j quantized iff M[t, j]; ``[B, Tq, Hq, d]``."""
    rep = q.shape[1] // kq.shape[1]
    q, kq, vq, kf, vf = (t.double() for t in (q, kq, vq, kf, vf))
    kq, vq, kf, vf = (t.repeat_interleave(rep, dim=1) for t in (kq, vq, kf, vf))
    s = torch.where(M, q @ kq.transpose(-1, -2), q @ kf.transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, -math.inf)
    live = mask.any(-1, keepdim=True)
    p = torch.where(live, s.softmax(-1), 0.0)
    out = (p * M) @ vq + (p * ~M) @ vf
    return out.transpose(1, 2)


def _case(B=2, Hq=4, Hkv=2, Tq=37, Tk=37, d=8, seed=0, pad=5, window=None, group=4, residual=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, d, generator=g)
    kf, vf = torch.randn(B, Hkv, Tk, d, generator=g), torch.randn(B, Hkv, Tk, d, generator=g)
    kq, vq = kf + 0.1 * torch.randn_like(kf), vf + 0.1 * torch.randn_like(vf)
    t = torch.arange(Tk - Tq, Tk).unsqueeze(1)
    j = torch.arange(Tk).unsqueeze(0)
    n_q = torch.div((t + 1 - residual).clamp_min(0), group, rounding_mode="floor") * group
    M = j < n_q  # streaming layout: whole groups quantized, the residual edge in full precision
    mask = (j <= t).expand(B, 1, Tq, Tk).clone()
    if window is not None:
        mask &= j > t - window
    if B > 1:
        mask[1, :, :, :pad] = False  # a left-padded row: its pad keys are never seen ...
        mask[1, :, :pad, :] = False  # ... and its pad queries see nothing
    return q, kq, vq, kf, vf, M, mask


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["sdpa-path", "softcap-path"])
@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("block", [1, 7, 10_000])
def test_mixed_attention_equals_the_float64_reference(monkeypatch, softcap, window, block) -> None:
    monkeypatch.setattr(attention, "SDPA_BLOCK", block)
    monkeypatch.setattr(attention, "BLOCK_BYTES", block * 2 * 4 * 37 * 4 * 3)
    q, kq, vq, kf, vf, M, mask = _case(window=window)
    out = blockwise_attention(q, kq, vq, mask, 0.35, softcap=softcap, mixed=MixedKV(kf, vf, M))
    ref = reference(q, kq, vq, kf, vf, M, mask, 0.35, softcap)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), ref, atol=1e-5), float((out.double() - ref).abs().max())
    assert torch.equal(out[1, :5], torch.zeros_like(out[1, :5]))  # pad query rows: zeros, not NaN


def test_without_a_mask_it_is_causal_within_the_window() -> None:
    q, kq, vq, kf, vf, M, _ = _case(B=1, window=6)
    t = torch.arange(37).unsqueeze(1)
    j = torch.arange(37).unsqueeze(0)
    causal = ((j <= t) & (j > t - 6)).view(1, 1, 37, 37)
    out = blockwise_attention(q, kq, vq, None, 0.5, window=6, mixed=MixedKV(kf, vf, M))
    assert torch.allclose(out.double(), reference(q, kq, vq, kf, vf, M, causal, 0.5), atol=1e-5)


def test_softcap_without_mixing_equals_the_reference() -> None:
    q, kq, vq, _, _, _, mask = _case()
    none = torch.zeros(37, 37, dtype=torch.bool)
    out = blockwise_attention(q, kq, vq, mask, 0.35, softcap=3.0)
    assert torch.allclose(out.double(), reference(q, kq, vq, kq, vq, none, mask, 0.35, 3.0), atol=1e-5)

"""The rotation axis: the fast Walsh-Hadamard transform against a float64 reference, the
randomized transform orthogonal and exactly inverted for every head dim, seeded, and a cache with
a rotation quantizing the rotated features (and helping where a channel carries outliers)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvq.alloc import FixedBits
from kvq.cache import KVQuantSpec, QuantizedCache
from kvq.models import TinyRandomLlama
from kvq.protocols import rope_of
from kvq.quant import HadamardRotation, NoRotation, UniformQuantizer, fwht

#: powers of two, the non-power-of-two head dims of real models (80, 96, 120) and odd ones
HEAD_DIMS = [1, 2, 8, 16, 64, 128, 80, 96, 120, 7, 3]


def sylvester(n: int) -> torch.Tensor:
    """The ``n x n`` Sylvester Hadamard matrix in float64 (``H_2n = [[H, H], [H, -H]]``)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 128])
def test_fwht_is_the_orthonormal_hadamard_transform(n: int) -> None:
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    ref = x @ sylvester(n).t() / n**0.5
    assert torch.allclose(fwht(x), ref, atol=1e-12)
    assert torch.allclose(fwht(fwht(x)), x, atol=1e-12)  # its own inverse


def test_fwht_refuses_a_length_that_is_not_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(2, 12))


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_rotation_is_orthogonal_and_exactly_inverted(d: int) -> None:
    rot = HadamardRotation(seed=3)
    r = rot.matrix(1, "key", d).double()
    assert torch.allclose(r @ r.t(), torch.eye(d, dtype=torch.float64), atol=1e-5)
    x = torch.randn(2, 3, 17, d, generator=torch.Generator().manual_seed(d))
    y = rot.rotate(x, 1, "key")
    assert y.dtype == torch.float32 and y.shape == x.shape
    # rotate is R x per head (a float64 reference), unrotate(rotate(x)) == x up to float32 rounding
    assert torch.allclose(y.double(), x.double() @ r.t(), atol=1e-5)
    assert torch.allclose(rot.unrotate(y, 1, "key"), x, atol=1e-5)
    # norms are kept: an orthogonal transform moves no energy in or out
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


@pytest.mark.parametrize("d", [16, 80])
def test_rotation_mixes_every_feature(d: int) -> None:
    """Every output feature depends on every input feature (what spreads an outlier channel)."""
    r = HadamardRotation().matrix(0, "value", d)
    assert bool((r.abs() > 1e-6).all())


def test_unrotate_returns_the_dtype_it_was_given() -> None:
    rot = HadamardRotation()
    x = torch.randn(1, 2, 4, 64).half()
    assert rot.unrotate(rot.rotate(x, 0, "value").half(), 0, "value").dtype == torch.float16


def test_rotation_is_seeded_per_layer_and_kind_and_independent_of_order() -> None:
    d = 64
    a, b = HadamardRotation(seed=0), HadamardRotation(seed=0)
    m1 = a.matrix(2, "key", d)
    b.matrix(0, "value", d)  # another layer first: the transform of layer 2 must not change
    assert torch.equal(m1, b.matrix(2, "key", d))
    assert not torch.equal(m1, HadamardRotation(seed=1).matrix(2, "key", d))
    assert not torch.equal(m1, a.matrix(3, "key", d))
    assert not torch.equal(m1, a.matrix(2, "value", d))


def test_keys_or_values_only() -> None:
    x = torch.randn(1, 2, 5, 16)
    rot = HadamardRotation(keys=False)
    assert rot.rotate(x, 0, "key") is x and rot.unrotate(x, 0, "key") is x
    assert not torch.allclose(rot.rotate(x, 0, "value"), x)
    assert NoRotation().rotate(x, 0, "key") is x and not NoRotation.rotates


def outlier_keys(d: int = 64, t: int = 256) -> torch.Tensor:
    """``[1, 1, t, d]`` keys with two outlier channels (as real keys have)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, t, d, generator=g)
    x[..., 3] *= 20.0
    x[..., 40] += 15.0
    return x


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rotation_lowers_the_error_of_per_token_groups_with_outlier_channels(bits: int) -> None:
    x = outlier_keys()
    q = UniformQuantizer()
    rot = HadamardRotation()

    def err(y: torch.Tensor) -> float:
        return float((y - x).pow(2).mean())

    plain = q.fake_quant(x.reshape(-1, 64), bits).view_as(x)
    rotated = rot.unrotate(q.fake_quant(rot.rotate(x, 0, "key").reshape(-1, 64), bits).view_as(x), 0, "key")
    assert err(rotated) < 0.5 * err(plain)


@pytest.fixture(scope="module")
def tiny():
    return TinyRandomLlama(n_layers=2, vocab_size=512).load().model


@torch.no_grad()
def _logits(model, ids, cache) -> torch.Tensor:
    return model(ids, cache=cache).logits


@pytest.mark.parametrize("gran", ["head", "layer"])
@pytest.mark.parametrize("pre_rope", [False, True])
def test_cache_quantizes_the_rotated_features(tiny, gran: str, pre_rope: bool) -> None:
    """The cache hands back ``unrotate(deq(q(rotate(x))))``: at 8 bits the model's logits stay close
    to full precision, at 2 bits they differ from the unrotated cache's (the rotation is applied)."""
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = _logits(tiny, ids, DynamicCache())

    def cache(bits: int, rotation) -> QuantizedCache:
        spec = KVQuantSpec(UniformQuantizer(), granularity=gran, rotation=rotation, pre_rope=pre_rope)
        c = QuantizedCache(spec, 2, FixedBits(bits))
        if pre_rope:
            c.set_rope(rope_of(tiny))
        return c

    rot = HadamardRotation()
    out8 = _logits(tiny, ids, cache(8, rot))
    assert (out8 - ref).abs().max() < 0.02 * ref.abs().max()
    out2, out2_plain = _logits(tiny, ids, cache(2, rot)), _logits(tiny, ids, cache(2, None))
    assert not torch.allclose(out2, out2_plain, atol=1e-3)

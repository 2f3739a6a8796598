"""The fused kernels (:mod:`kvq.quant.fused`) against the eager reference, bit for bit.

Every method of the shared matrix, every width, groupings that are absent / divide the unit /
leave a smaller last group, with and without outliers, per-unit widths, the input and output
dtypes the cache uses: the packed codes and the fp16 metadata must be equal byte for byte, the
decoded values equal. The kernels are built once per machine (~1-5 s, cached on disk); a test
that needs them and finds no C compiler is skipped.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvq.quant import FullPrecision, QTensor, Quantizer, UniformQuantizer, fused

from ..matrix import QUANTIZING as METHODS

needs_kernels = pytest.mark.skipif(
    fused.library() is None, reason=f"fused kernels unavailable: {fused.build_info().get('reason')}"
)
pytestmark = needs_kernels


@pytest.fixture(autouse=True)
def _fused_on():
    """These tests decide themselves which path runs (whatever ``$KVQ_FUSED`` says)."""
    with fused.using(True):
        yield


def _data(seed: int, n: int, d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 2.5 + 0.3
    x[:, ::7] *= 6.0  # a few large channels, as keys have
    return x.to(dtype)


def assert_same(a: QTensor, b: QTensor) -> None:
    """Two blocks hold the same bytes: parts (widths, unit counts, codes, metadata), widths, outliers."""
    assert (a.n_units, a.unit_size) == (b.n_units, b.unit_size)
    assert len(a.parts) == len(b.parts)
    for p, q in zip(a.parts, b.parts):
        assert (p.bits, p.n_units) == (q.bits, q.n_units)
        assert torch.equal(p.codes, q.codes), f"codes differ at {p.bits} bits"
        assert p.meta.keys() == q.meta.keys()
        for k in p.meta:
            assert p.meta[k].dtype == q.meta[k].dtype and p.meta[k].shape == q.meta[k].shape
            assert torch.equal(p.meta[k].view(torch.int16), q.meta[k].view(torch.int16)), f"meta {k} differs"
    for x, y in (
        (a.unit_bits, b.unit_bits),
        (a.outlier_values, b.outlier_values),
        (a.outlier_index, b.outlier_index),
    ):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)


def check(q: Quantizer, x: torch.Tensor, bits: int | torch.Tensor, out: torch.Tensor | None = None) -> None:
    """Fused and eager encode to the same bytes and decode to the same values, in every output dtype."""
    fq, rq = q.encode(x, bits), q.encode_reference(x, bits)
    assert_same(fq, rq)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        fy, ry = q.decode(fq, dtype), q.decode_reference(rq, dtype)
        assert fy.dtype == ry.dtype == dtype
        assert torch.equal(fy, ry), f"decode differs in {dtype}: {(fy.float() - ry.float()).abs().max()}"


def _uses_kernel(q: Quantizer) -> bool:
    return q.fused_spec(4) is not None and q._fused_applies()


# -------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("group", [None, 32, 40])  # none, divides 96, leaves a last group of 16
@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_every_width_matches_reference(method: str, group: int | None, ratio: float) -> None:
    q = METHODS[method](group, ratio)
    x = _data(1, 37, 96)
    for bits in range(1, 9):
        check(q, x, bits)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("ratio", [0.0, 0.05])
def test_per_unit_widths_match_reference(method: str, ratio: float) -> None:
    q = METHODS[method](40, ratio)
    x = _data(2, 120, 96)
    bits = torch.randint(1, 9, (120,), generator=torch.Generator().manual_seed(3))
    check(q, x, bits)
    check(q, x, torch.full((120,), 3))  # one width given per unit: one part, no width table


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cache_dtypes_and_layer_units(method: str, dtype: torch.dtype) -> None:
    # what the cache hands over: fp16/bf16 K/V, layer units of 192 (g128: groups of 128 and 64),
    # head units of 64, per-channel key groups of 32 tokens
    for n, d, g in [(512, 192, 128), (96, 64, None), (384, 32, None), (5, 576, 128)]:
        check(METHODS[method](g, 0.0), _data(n + d, n, d, dtype), 4)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 70),
    d=st.integers(1, 300),
    group=st.sampled_from([None, 1, 3, 8, 16, 32, 40, 64, 100, 128, 1000]),
    method=st.sampled_from(sorted(METHODS)),
    bits=st.integers(1, 8),
    ratio=st.sampled_from([0.0, 0.02, 0.2]),
    scale=st.sampled_from([1e-6, 1.0, 300.0]),
)
def test_shapes_match_reference(seed, n, d, group, method, bits, ratio, scale) -> None:
    x = _data(seed, n, d) * scale
    check(METHODS[method](group, ratio), x, bits)


def test_heavy_ties_and_constant_units() -> None:
    # repeated values (ties in the adaptive sort), constant rows, a row of zeros, tiny ranges
    x = torch.randint(-3, 4, (64, 128)).float() * 0.25
    x[0] = 1.5
    x[1] = 0.0
    x[2] = torch.linspace(0, 1e-6, 128)
    for method in sorted(METHODS):
        for bits in (1, 2, 4, 8):
            check(METHODS[method](32, 0.0), x, bits)
            check(METHODS[method](None, 0.05), x, bits)


def test_normal_std_on_an_fp16_rounding_tie() -> None:
    """A unit whose float32 variance is 10.581550598144531: its correctly rounded sqrt,
    3.2529294, rounds to the fp16 std 3.251953125; torch's CPU float32 sqrt returns 3.2529296875,
    exactly the tie, which rounds to even (3.25390625). The reference must be the IEEE sqrt the
    kernels (and GPUs) compute -- in the embedded model's layer units this flipped the std of about
    one unit in 4,096 and moved normal's 4-bit perplexity by 0.2%."""
    from kvq.quant import NormalQuantizer

    a, b = 3.0722129344940186, 3.424121379852295  # fl(fl(a^2) + fl(b^2)) / 2 = 10.581550598144531
    x = torch.tensor([[a, -a, b, -b]])
    q = NormalQuantizer()
    exact = float(torch.tensor(10.581550598144531, dtype=torch.float64).sqrt().float().half())
    for path in (q.encode, q.encode_reference):
        assert path(x, 4).parts[0].meta["std"].item() == exact == 3.251953125
    check(q, x, 4)
    # and in bulk: layer units of fp16 keys-like data, byte for byte
    check(NormalQuantizer(), _data(7, 4096, 192, torch.float16), 4)


# -------------------------------------------------------------------------- the dispatch
def test_large_block_split_over_threads_matches() -> None:
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = _data(5, 4099, 128, torch.float16)  # several chunks, the last one ragged
        for method in sorted(METHODS):
            check(METHODS[method](128, 0.0), x, 4)
    finally:
        torch.set_num_threads(prev)


def test_growing_cache_builds_once() -> None:
    # chunks of every size (token-by-token decoding, then a prefill) reuse the one library: no
    # per-shape compilation
    lib = fused.library()
    q = UniformQuantizer(group_size=128)
    for n in [*range(1, 20), 64, 333, 1024]:
        x = _data(n, n, 192, torch.float16)
        check(q, x, 4)
    assert fused.library() is lib
    assert fused.build_info()["available"]


def test_kernel_runs_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = fused.encode_part
    monkeypatch.setattr(fused, "encode_part", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _data(0, 16, 64)
    for method in sorted(METHODS):
        q = METHODS[method](32, 0.0)
        calls.clear()
        q.encode(x, 4)
        assert bool(calls) == _uses_kernel(q), method
    calls.clear()
    with fused.using(False):
        UniformQuantizer(group_size=32).encode(x, 4)
    assert not calls
    calls.clear()
    UniformQuantizer(group_size=32).encode(x.double(), 4)  # float64: not a kernel dtype
    assert not calls


def test_a_subclass_overriding_a_hook_runs_the_eager_path(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclasses.dataclass
    class Clipped(UniformQuantizer):
        def _assign(self, x, meta, bits):
            return super()._assign(x, meta, bits) // 2

    monkeypatch.setattr(fused, "encode_part", lambda *a, **k: pytest.fail("the kernel ran"))
    monkeypatch.setattr(fused, "decode_part", lambda *a, **k: pytest.fail("the kernel ran"))
    q = Clipped(group_size=32)
    x = _data(0, 8, 64)
    qt = q.encode(x, 3)
    assert torch.equal(q.decode(qt), q.decode_reference(q.encode_reference(x, 3)))


def test_non_finite_values_fall_back_to_the_reference() -> None:
    x = _data(0, 20, 64)
    x[3, 5] = float("nan")
    x[7, 9] = float("inf")
    x[9, 1] = 3e35  # finite, but the reference's arithmetic overflows
    for method in sorted(METHODS):
        q = METHODS[method](32, 0.0)
        fq, rq = q.encode(x, 4), q.encode_reference(x, 4)
        for p, r in zip(fq.parts, rq.parts):
            assert torch.equal(p.codes, r.codes)
            for k in p.meta:
                assert torch.equal(p.meta[k].view(torch.int16), r.meta[k].view(torch.int16))


def test_take_and_full_precision_unaffected() -> None:
    q = METHODS[sorted(METHODS)[0]](32, 0.05)
    x = _data(4, 30, 64)
    rows = torch.tensor([5, 0, 29, 5, 11])
    assert_same(q.encode(x, 3).take(rows), q.encode_reference(x, 3).take(rows))
    fp = FullPrecision()
    assert torch.equal(fp.decode(fp.encode(x), torch.float32), x)


def test_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    with fused.using(False):
        assert not fused.enabled()
    fused.set_enabled(None)
    try:
        for value, on in (("0", False), ("off", False), ("eager", False), ("1", True), ("auto", True)):
            monkeypatch.setenv(fused.ENV, value)
            monkeypatch.setattr(fused, "_env", None)  # read again
            assert fused.enabled() is on, value
    finally:
        monkeypatch.setattr(fused, "_env", None)
        fused.set_enabled(True)

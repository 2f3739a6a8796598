"""Quantizer properties: error vs bits, error bounds, accounting, heavy tails, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvq.quant import AdaptiveQuantizer, FullPrecision, NormalQuantizer, Quantizer, UniformQuantizer
from kvq.quant.methods import gaussian_codebook

from ..matrix import QUANTIZING as METHODS  # the shared matrix: every quantizing method


def _data(seed: int, n: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3 + 0.5


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


shapes = st.tuples(st.integers(4, 48), st.sampled_from([16, 24, 64, 96, 128]))
groups = st.sampled_from([None, 8, 32, 40, 64, 1000])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shape=st.tuples(st.integers(32, 64), st.sampled_from([64, 96, 128])),
    group=st.sampled_from([None, 32, 40, 64, 1000]),
    method=st.sampled_from(sorted(METHODS)),
)
def test_error_shrinks_as_bits_grow(
    seed: int, shape: tuple[int, int], group: int | None, method: str
) -> None:
    # A property of the expected error: it needs a few thousand values and groups of >= 32
    # (per element, Gaussian bins and min-max grids are not nested across widths).
    x = _data(seed, *shape)
    q: Quantizer = METHODS[method](group, 0.0)
    errs = [mse(x, q.fake_quant(x, b)) for b in range(1, 9)]
    # monotone up to fp16 rounding of the metadata
    for lo, hi in zip(errs[1:], errs[:-1]):
        assert lo <= hi * 1.001 + 1e-9, errs
    assert errs[-1] < errs[0] / 50 or errs[0] < 1e-9


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shape=shapes,
    group=groups,
    bits=st.integers(1, 8),
    symmetric=st.booleans(),
    ratio=st.sampled_from([0.0, 0.05, 0.2]),
)
def test_uniform_error_at_most_half_a_step(seed, shape, group, bits, symmetric, ratio) -> None:
    x = _data(seed, *shape)
    q = UniformQuantizer(group_size=group, outlier_ratio=ratio, symmetric=symmetric)
    qt = q.encode(x, bits)
    y = q.decode(qt)
    D = x.shape[1]
    g = q.effective_group_size(D)
    G = q.n_groups(D)
    step = qt.parts[0].meta["scale"].float().squeeze(-1)  # [N, G]
    step_el = step.repeat_interleave(g, dim=1)[:, :D]
    err = (x - y).abs()
    outlier = torch.zeros_like(x, dtype=torch.bool)
    if qt.outlier_index is not None:
        outlier.scatter_(1, qt.outlier_index.long(), True)
        # outliers are stored in fp16: relative error of fp16 rounding only
        assert torch.all(err[outlier] <= x.abs()[outlier] * 2**-11 + 1e-12)
    bound = 0.5 * step_el * (1 + 1e-5) + 1e-6 * x.abs().max()
    assert torch.all(err[~outlier] <= bound[~outlier]), float((err - bound)[~outlier].max())
    assert math.ceil(D / g) == G


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shape=shapes,
    group=groups,
    method=st.sampled_from(sorted(METHODS)),
    ratio=st.sampled_from([0.0, 0.03, 0.1]),
    variable=st.booleans(),
)
def test_accounting_equals_stored_bytes(seed, shape, group, method, ratio, variable) -> None:
    x = _data(seed, *shape)
    q = METHODS[method](group, ratio)
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(1, 9, (x.shape[0],), generator=gen) if variable else int(seed % 8) + 1
    qt = q.encode(x, bits)
    counts = {b: int((bits == b).sum()) for b in range(1, 9)} if variable else bits
    assert qt.nbytes() == q.nbytes_formula(*x.shape, counts)
    # variable widths decode to the same values as encoding each width separately
    if variable:
        y = q.decode(qt)
        for b in torch.unique(bits).tolist():
            rows = (bits == b).nonzero().squeeze(1)
            assert torch.allclose(y[rows], q.fake_quant(x[rows], b), atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("group", [None, 32, 128])
def test_adaptive_beats_uniform_on_heavy_tails(bits: int, group: int | None) -> None:
    torch.manual_seed(bits * 31 + (group or 0))
    x = torch.distributions.StudentT(torch.tensor(2.5)).sample((256, 128))
    ua = mse(x, UniformQuantizer(group_size=group).fake_quant(x, bits))
    ad = mse(x, AdaptiveQuantizer(group_size=group).fake_quant(x, bits))
    assert ad < 0.8 * ua, (ad, ua)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(1, 8), group=groups)
def test_adaptive_never_worse_than_uniform_grid(seed: int, bits: int, group: int | None) -> None:
    torch.manual_seed(seed)
    x = torch.distributions.StudentT(torch.tensor(3.0)).sample((32, 128))
    ua = mse(x, UniformQuantizer(group_size=group).fake_quant(x, bits))
    ad = mse(x, AdaptiveQuantizer(group_size=group).fake_quant(x, bits))
    assert ad <= ua * 1.01 + 1e-7


def _code(x: float, lv: list[float]) -> int:
    """Nearest level; a value on a midpoint goes down."""
    return sum(x > (a + b) / 2 for a, b in zip(lv[:-1], lv[1:]))


def _sq_err(s: list[float], lv: list[float]) -> float:
    return sum((x - lv[_code(x, lv)]) ** 2 for x in s)


def _adaptive_reference(v: list[float], bits: int, lloyd_iters: int) -> list[float]:
    """The adaptive codebook of one group, written plainly in float64 (before fp16 rounding)."""
    s, L = sorted(v), 1 << bits
    n = len(s)
    code, err = _code, lambda lv: _sq_err(s, lv)

    quantile: list[float] = []
    for k in range(L):
        run = s[math.ceil(k * n / L) : math.ceil((k + 1) * n / L)]
        quantile.append(sum(run) / len(run) if run else quantile[-1])
    grid = [s[0] + (s[-1] - s[0]) * k / (L - 1) for k in range(L)] if L > 1 else [s[0]]
    lv = quantile if err(quantile) <= err(grid) else grid
    for _ in range(lloyd_iters):
        bins: list[list[float]] = [[] for _ in range(L)]
        for x in s:
            bins[code(x, lv)].append(x)
        new = [sum(b) / len(b) if b else old for b, old in zip(bins, lv)]
        # an empty bin takes the (new) level below it; a first empty bin keeps its old level
        lv = [new[0]]
        for b, v in zip(bins[1:], new[1:]):
            lv.append(v if b else lv[-1])
    return lv


@pytest.mark.parametrize(
    "group, ratio, bits, iters",
    [
        (None, 0.0, 1, 2),
        (32, 0.0, 2, 2),
        (40, 0.1, 3, 2),
        (64, 0.0, 4, 0),
        (64, 0.05, 4, 3),
        (8, 0.0, 4, 2),
        (1000, 0.0, 8, 2),
    ],
)
def test_adaptive_codebook_matches_float64_reference(group, ratio, bits, iters) -> None:
    torch.manual_seed(bits + iters)
    x = torch.distributions.StudentT(torch.tensor(3.0)).sample((6, 100))  # last group smaller
    q = AdaptiveQuantizer(group_size=group, outlier_ratio=ratio, lloyd_iters=iters)
    qt = q.encode(x, bits)
    book = qt.parts[0].meta["codebook"].float()  # [N, G, L]
    keep = torch.ones_like(x, dtype=torch.bool)
    if qt.outlier_index is not None:
        keep.scatter_(1, qt.outlier_index.long(), False)
    g = q.effective_group_size(x.shape[1])
    for i in range(x.shape[0]):
        for j in range(book.shape[1]):
            sl = slice(j * g, (j + 1) * g)
            v = x[i, sl][keep[i, sl]].double().tolist()
            ref = torch.tensor(_adaptive_reference(v, bits, iters), dtype=torch.float64)
            if len(v) >= 4 << bits:
                # float32 sums vs float64: relative to the group's spread, then fp16 rounding
                tol = 2e-3 * float(ref.max() - ref.min()) + 1e-6
                assert torch.allclose(book[i, j].double(), ref, rtol=1e-3, atol=tol), (i, j, book[i, j], ref)
            else:
                # few values per level: levels sit on values and values on midpoints, where a
                # float32 rounding picks the other of two equally good codebooks -- compare errors
                got, want = _sq_err(v, book[i, j].tolist()), _sq_err(v, ref.half().double().tolist())
                assert got <= want * 1.01 + 1e-7 * sum(t * t for t in v), (i, j, got, want)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shape=shapes,
    group=st.sampled_from([None, 4, 8, 40, 64]),
    bits=st.integers(1, 8),
    ratio=st.sampled_from([0.0, 0.1]),
    step=st.sampled_from([0.0, 0.25]),
)
def test_adaptive_codes_are_the_nearest_level(seed, shape, group, bits, ratio, step) -> None:
    # adaptive derives its codes from the sort its fit made; they must be the shared path's
    # nearest-level codes (ties on a midpoint included: step > 0 rounds data to a coarse grid)
    x = _data(seed, *shape)
    if step:
        x = (x / step).round() * step
    q = AdaptiveQuantizer(group_size=group, outlier_ratio=ratio)
    _, keep = (None, None) if not q.n_outliers(x.shape[1]) else q._split_outliers(x)[1:]
    xg, valid = q._grouped(x, keep)
    meta, codes = q._fit_assign(xg, valid, bits)
    book = meta["codebook"].float()
    assert (book.diff(dim=-1) >= 0).all()  # ascending, also with empty bins (tiny groups)
    ref = Quantizer._assign(q, xg, meta, bits)
    valid = valid.expand_as(xg)
    assert torch.equal(codes.long()[valid], ref[valid])


def test_normal_codebook_matches_float64_reference() -> None:
    from scipy.stats import norm

    for bits in range(1, 9):
        L = 2**bits
        bnd, lv = gaussian_codebook(bits)
        edges = norm.ppf([k / L for k in range(L + 1)])
        ref = [
            (norm.pdf(a) - norm.pdf(b)) / (norm.cdf(b) - norm.cdf(a)) for a, b in zip(edges[:-1], edges[1:])
        ]
        ref_t = torch.tensor(ref, dtype=torch.float64)
        assert torch.allclose(lv.double(), ref_t, rtol=1e-5, atol=1e-6)
        assert torch.allclose(bnd.double(), torch.tensor(edges[1:-1]), rtol=1e-5, atol=1e-6)
    assert torch.allclose(
        gaussian_codebook(1)[1], torch.tensor([-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)])
    )


def test_normal_bins_are_equal_mass_on_gaussian_data() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 4096)
    q = NormalQuantizer()
    qt = q.encode(x, 3)
    from kvq.quant.packing import unpack_codes

    codes = unpack_codes(qt.parts[0].codes, 3, x.numel()).long()
    freq = torch.bincount(codes, minlength=8).double() / x.numel()
    assert torch.allclose(freq, torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.01)


def test_grouping_last_group_smaller_and_large_group_is_one_group() -> None:
    q = UniformQuantizer(group_size=128)
    assert q.n_groups(192) == 2 and q.effective_group_size(192) == 128
    assert q.n_groups(64) == 1 and q.effective_group_size(64) == 64
    x = torch.randn(5, 192)
    qt = q.encode(x, 4)
    assert qt.parts[0].meta["scale"].shape == (5, 2, 1)
    # a group size that does not divide the unit still reconstructs every feature
    assert mse(x, q.fake_quant(x, 8)) < 1e-4


def test_outliers_are_kept_exactly_and_excluded_from_statistics() -> None:
    x = torch.randn(4, 64)
    x[:, 3] = 1000.0
    x[:, 7] = -1000.0
    plain = UniformQuantizer()
    with_out = UniformQuantizer(outlier_ratio=0.04)  # one per side per unit of 64
    assert with_out.n_outliers(64) == 1
    y = with_out.fake_quant(x, 4)
    assert torch.all(y[:, 3] == 1000.0) and torch.all(y[:, 7] == -1000.0)
    assert mse(x, y) < mse(x, plain.fake_quant(x, 4)) / 100


def test_full_precision_is_lossless_in_its_dtype() -> None:
    x = torch.randn(7, 33, dtype=torch.float64)
    assert torch.equal(FullPrecision().fake_quant(x, 4), x)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: UniformQuantizer(group_size=0), "group_size"),
        (lambda: UniformQuantizer(group_size=-4), "group_size"),
        (lambda: UniformQuantizer(outlier_ratio=0.5), "outlier_ratio"),
        (lambda: UniformQuantizer(outlier_ratio=-0.1), "outlier_ratio"),
        (lambda: AdaptiveQuantizer(lloyd_iters=-1), "lloyd_iters"),
    ],
)
def test_invalid_parameters_fail_at_construction(build, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        build()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bits", [0, 9, 2.5])
def test_invalid_bits(bits) -> None:
    with pytest.raises(ValueError, match="bits must be an integer in 1..8"):
        UniformQuantizer().encode(torch.randn(2, 8), bits)

"""The Triton kernels (:mod:`kvq.quant.fused_triton`) against the eager reference, bit for bit.

On a machine without a GPU the kernels run in Triton's interpreter on CPU tensors: a copy of the
module whose ``@triton.jit`` ran with ``TRITON_INTERPRET=1`` (:func:`fused_triton.interpreted`),
so the rest of the session keeps compiled Triton. The fixture :func:`triton_cpu` routes CPU
tensors through that copy instead of the C kernels, so ``Quantizer.encode`` / ``decode`` take the
whole fused path (outlier split, per-unit width parts, decode into rows) with the Triton kernels,
and every check also asserts that the kernels ran (a fallback to the reference would make the
comparison empty). Same matrix as ``test_fused.py``: every method, widths 1..8, groupings absent /
dividing / leaving a smaller last group, outliers, per-unit widths, fp32/fp16/bf16 in and out,
odd row counts, layouts packed in the kernel (``D`` and the group multiples of 8) and by the
packing kernel. Shapes stay small: the interpreter runs every program in NumPy.

A ``slow`` test compiles the kernels through Triton's GPU pipeline to sm_90 code (no GPU needed):
the interpreter accepts code the GPU compiler rejects. ``gpu`` tests compare a CUDA encode/decode
with the CPU reference where a GPU is present.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import types
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvq.quant import AdaptiveQuantizer, NormalQuantizer, Quantizer, UniformQuantizer, fused

from ..matrix import QUANTIZING as METHODS
from .test_fused import _data, assert_same

# triton is in the dev extra wherever it installs (Linux): a missing one there is an error
triton = pytest.importorskip("triton") if platform.system() != "Linux" else __import__("triton")
from kvq.quant import fused_triton  # noqa: E402

FT = fused_triton.interpreted()
#: the methods with Triton encoders and decoders
ENCODED = ("uniform", "normal", "adaptive")


class Ran:
    """What the Triton entry points did during a test."""

    def __init__(self) -> None:
        self.encoded = self.fell_back = self.decoded = 0


@contextlib.contextmanager
def routed() -> Iterator[Ran]:
    """CPU tensors through the interpreted Triton kernels (not the C ones); a kernel error raises."""
    ran = Ran()
    real_encode, real_decode = FT.encode, FT.decode

    def encode(*a, **k):
        out = real_encode(*a, **k)
        if out is None:
            ran.fell_back += 1
        else:
            ran.encoded += 1
        return out

    def decode(*a, **k):
        done = real_decode(*a, **k)
        ran.decoded += int(done)
        return done

    def failed(e: Exception) -> None:
        raise e

    with pytest.MonkeyPatch.context() as mp, fused.using(True):
        mp.setattr(FT, "encode", encode)
        mp.setattr(FT, "decode", decode)
        mp.setitem(fused._BACKENDS, "cpu", "triton")
        mp.setattr(fused, "_triton_mod", FT)
        mp.setattr(fused, "_triton_tried", True)
        mp.setattr(fused, "_triton_failed", failed)
        mp.setattr(FT, "STRICT", True)
        yield ran


@pytest.fixture
def triton_cpu() -> Iterator[Ran]:
    with routed() as ran:
        yield ran


def _kernel_method(q: Quantizer) -> str | None:
    spec = q.fused_spec(4) if q._fused_applies() else None
    return None if spec is None else spec.method


#: the matrix entries with Triton kernels (the others run the eager path on every device)
KERNELS = sorted(name for name, make in METHODS.items() if _kernel_method(make(None, 0.0)))


def check(ran: Ran, q: Quantizer, x: torch.Tensor, bits: int | torch.Tensor, dtypes=(torch.float32,)) -> None:
    """Encode and decode through the Triton kernels equal the reference, and the kernels ran."""
    before = (ran.encoded, ran.fell_back, ran.decoded)
    fq, rq = q.encode(x, bits), q.encode_reference(x, bits)
    assert_same(fq, rq)
    for dtype in dtypes:
        fy, ry = q.decode(fq, dtype), q.decode_reference(rq, dtype)
        assert fy.dtype == ry.dtype == dtype
        assert torch.equal(fy, ry), f"decode differs in {dtype}: {(fy.float() - ry.float()).abs().max()}"
    method = _kernel_method(q)
    parts = len(fq.parts)
    if method in ENCODED:
        assert (ran.encoded - before[0], ran.fell_back - before[1]) == (parts, 0), "encode fell back"
    if method is not None:
        assert ran.decoded - before[2] == parts * len(dtypes), "decode fell back"


# -------------------------------------------------------------------------- the matrix
def test_the_matrix_has_kernels() -> None:
    assert {"uniform", "uniform_sym", "normal", "adaptive"} <= set(KERNELS)


@pytest.mark.parametrize("method", KERNELS)
@pytest.mark.parametrize("group", [None, 32, 40])  # none, divides 96, leaves a last group of 16
@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_every_width_matches_reference(triton_cpu: Ran, method: str, group: int | None, ratio: float) -> None:
    q = METHODS[method](group, ratio)
    x = _data(1, 37, 96)
    for bits in range(1, 9):
        check(triton_cpu, q, x, bits, (torch.float32, torch.bfloat16) if bits in (1, 5) else (torch.float32,))


@pytest.mark.parametrize("method", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_input_and_output_dtypes(triton_cpu: Ran, method: str, dtype: torch.dtype) -> None:
    # cache-like layouts: layer units of 192 in g128 (groups of 128 and 64), head units of 64, an
    # odd unit size (packing kernel), an odd row count
    q = METHODS[method]
    for n, d, g, bits in [(33, 192, 128, 4), (16, 64, None, 3), (7, 100, 32, 5), (5, 24, 8, 8)]:
        check(triton_cpu, q(g, 0.0), _data(n + d, n, d, dtype), bits, (torch.float32, torch.float16, dtype))


@pytest.mark.parametrize("method", KERNELS)
@pytest.mark.parametrize("ratio", [0.0, 0.05])
def test_per_unit_widths_match_reference(triton_cpu: Ran, method: str, ratio: float) -> None:
    q = METHODS[method](40, ratio)
    x = _data(2, 45, 96, torch.float16)
    bits = torch.randint(1, 9, (45,), generator=torch.Generator().manual_seed(3))
    check(triton_cpu, q, x, bits, (torch.float32, torch.float16))
    check(triton_cpu, q, x, torch.full((45,), 3))  # one width given per unit: one part, no width table


def test_many_programs_per_launch(triton_cpu: Ran, monkeypatch: pytest.MonkeyPatch) -> None:
    # the interpreted copy takes large tiles (one program per launch in most tests); a small tile
    # splits a block over many programs, the last one ragged, as the compiled kernels' 2048 does
    monkeypatch.setattr(FT, "TILE", 256)
    x = _data(9, 21, 100, torch.float16)
    bits = torch.tensor([3, 5] * 10 + [3])
    for name in ("uniform", "uniform_sym", "normal", "adaptive"):
        check(triton_cpu, METHODS[name](32, 0.05), x, bits, (torch.float32, torch.bfloat16))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 40),
    d=st.integers(1, 150),
    group=st.sampled_from([None, 1, 3, 8, 16, 40, 64, 1000]),
    method=st.sampled_from(["uniform", "uniform_sym", "normal", "adaptive"]),
    bits=st.integers(1, 8),
    ratio=st.sampled_from([0.0, 0.2]),
    scale=st.sampled_from([1e-6, 1.0, 300.0]),
)
def test_shapes_match_reference(seed, n, d, group, method, bits, ratio, scale) -> None:
    with routed() as ran:
        check(ran, METHODS[method](group, ratio), _data(seed, n, d) * scale, bits)


def test_heavy_ties_constant_units_and_fp16_tie(triton_cpu: Ran) -> None:
    # repeated values, constant rows, a row of zeros, tiny ranges (subnormal fp16 scales)
    x = torch.randint(-3, 4, (24, 64)).float() * 0.25
    x[0] = 1.5
    x[1] = 0.0
    x[2] = torch.linspace(0, 1e-6, 64)
    for name in ("uniform", "uniform_sym", "normal", "adaptive"):
        for bits in (1, 2, 4, 8):
            check(triton_cpu, METHODS[name](32, 0.0), x, bits)
            check(triton_cpu, METHODS[name](None, 0.05), x, bits)
    # normal's std on an fp16 rounding tie (see test_fused): the correctly rounded sqrt
    a, b = 3.0722129344940186, 3.424121379852295
    q = NormalQuantizer()
    qt = q.encode(torch.tensor([[a, -a, b, -b]]), 4)
    assert qt.parts[0].meta["std"].item() == 3.251953125
    check(triton_cpu, q, torch.tensor([[a, -a, b, -b]]), 4)


def test_group_sums_in_the_reference_order(triton_cpu: Ran) -> None:
    # normal's mean in tree_sum's order (halves added): [4096, e, -4096, e], e = 2**-12, sums to
    # (4096 - 4096) + (e + e) = 2**-11, mean 2**-13; left to right 4096 + e rounds to 4096 (a tie,
    # to even) and the mean is 2**-14. Same pattern across 16 and 128 features, and in rows.
    e = 2.0**-12
    x = torch.zeros(3, 128)
    x[0, :4] = torch.tensor([4096.0, e, -4096.0, e])
    x[1, [0, 1, 8, 9]] = torch.tensor([4096.0, e, -4096.0, e])
    x[2, [0, 3, 64, 67]] = torch.tensor([4096.0, e, -4096.0, e])
    for q, want in ((NormalQuantizer(group_size=4), 2.0**-13), (NormalQuantizer(group_size=16), 2.0**-15)):
        assert q.encode_reference(x, 4).parts[0].meta["mean"][0, 0, 0].item() == want
        check(triton_cpu, q, x, 4)
    check(triton_cpu, NormalQuantizer(), x, 4)


def test_adaptive_keeps_either_initial_codebook(triton_cpu: Ran) -> None:
    # heavy tails (x**3): the min-max grid beats the quantile codebook in some groups, not in
    # others -- both branches of the choice, before and after Lloyd steps
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) ** 3
    xs = x.view(16, 2, 32)
    lo, hi = xs.amin(-1, keepdim=True), xs.amax(-1, keepdim=True)
    for bits in (2, 3, 4):
        q0 = AdaptiveQuantizer(group_size=32, lloyd_iters=0)
        cb = q0.encode_reference(x, bits).parts[0].meta["codebook"].float()
        grid = (lo + (hi - lo) * torch.linspace(0, 1, 1 << bits)).half().float()
        assert 0 < int((cb == grid).all(-1).sum()) < 32 or bits == 3
        check(triton_cpu, q0, x, bits)
        check(triton_cpu, AdaptiveQuantizer(group_size=32), x, bits)


# -------------------------------------------------------------------------- the entry points
def test_direct_calls_on_cpu_tensors() -> None:
    """``encode`` / ``decode`` of the interpreted module, called as fused.encode_part would."""
    q = UniformQuantizer(group_size=32)
    x = _data(3, 9, 64, torch.bfloat16)
    ref = q.encode_reference(x, 3).parts[0]
    meta, packed = FT.encode(q.fused_spec(3), x, None, 3, 32)
    assert torch.equal(packed, ref.codes) and packed.numel() == 9 * 64 // 8 * 3
    assert torch.equal(meta["zero"].view(torch.int16), ref.meta["zero"].view(torch.int16))
    assert torch.equal(meta["scale"].view(torch.int16), ref.meta["scale"].view(torch.int16))
    out = torch.full((12, 64), float("nan"))
    rows = torch.tensor([11, 0, 3, 4, 5, 6, 7, 8, 9])
    assert FT.decode(q.fused_spec(3), packed, meta, 9, 64, 32, 3, out, rows)
    want = q.decode_reference(q.encode_reference(x, 3))
    assert torch.equal(out[rows], want)
    assert out[[1, 2, 10]].isnan().all()  # rows not named are left alone
    # adaptive the same way: the codebook [n, G, 2**bits] and the codes
    a = METHODS["adaptive"](32, 0.0)
    ref = a.encode_reference(x, 3).parts[0]
    meta, packed = FT.encode(a.fused_spec(3), x, None, 3, 32)
    assert torch.equal(packed, ref.codes)
    assert torch.equal(meta["codebook"].view(torch.int16), ref.meta["codebook"].view(torch.int16))
    # what the kernels do not take: float64, a group beyond MAX_GROUP
    assert FT.encode(q.fused_spec(3), x.double(), None, 3, 32) is None
    wide = torch.zeros(1, fused_triton.MAX_GROUP + 1)
    assert FT.encode(q.fused_spec(3), wide, None, 3, wide.shape[1]) is None


def test_non_finite_and_overflowing_values_fall_back(triton_cpu: Ran) -> None:
    x = _data(0, 20, 64)
    x[3, 5] = float("nan")
    x[7, 9] = float("inf")
    x[9, 1] = 3e35  # finite, but the reference's arithmetic overflows
    big = _data(1, 6, 64) * 3e4  # fp16 metadata overflows (|zero|, range, std beyond 65504)
    for name in ("uniform", "uniform_sym", "normal", "adaptive"):
        q = METHODS[name](32, 0.0)
        for data in (x, big):
            before = triton_cpu.fell_back
            fq, rq = q.encode(data, 4), q.encode_reference(data, 4)
            assert triton_cpu.fell_back == before + 1
            assert_same(fq, rq)
    # the kernels' own rule, called directly
    spec = UniformQuantizer(group_size=32).fused_spec(4)
    assert FT.encode(spec, x, None, 4, 32) is None
    assert FT.encode(spec, x[10:], None, 4, 32) is not None


# -------------------------------------------------------------------------- the dispatch
def test_dispatch_routes_by_device(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    # CPU tensors: the C kernels, as before; CUDA tensors: Triton where it imports, else eager
    assert fused._BACKENDS == {"cpu": "c", "cuda": "triton"}
    assert fused.triton_backend() is fused_triton  # triton is installed (the dev extra)
    assert fused.backend(torch.device("cuda")) == "triton"
    assert fused.backend(torch.device("meta")) is None
    monkeypatch.setattr(fused, "_triton_mod", None)
    assert fused.backend(torch.device("cuda")) is None
    # a kernel that raises: a warning, the eager reference, and the eager path from then on
    monkeypatch.setattr(fused, "_triton_mod", fused_triton)
    monkeypatch.setitem(fused._BACKENDS, "cpu", "triton")

    class Broken:
        @staticmethod
        def encode(*a, **k):
            raise RuntimeError("no such GPU")

    monkeypatch.setattr(fused, "_triton_mod", Broken)
    q = UniformQuantizer(group_size=32)
    x = _data(0, 8, 64)
    with fused.using(True), caplog.at_level(logging.WARNING, logger="kvq.quant.fused"):
        assert_same(q.encode(x, 4), q.encode_reference(x, 4))
    assert "no such GPU" in caplog.text
    assert fused._triton_mod is None and fused.backend(torch.device("cpu")) is None


def test_a_failing_kernel_configuration_runs_the_reference(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    # Triton's GPU compiler rejects a configuration: that one runs the reference from then on
    calls = []

    def launch(*a, **k):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(FT, "K", types.SimpleNamespace(encode_kernel=_Grid(launch)))
    monkeypatch.setattr(FT, "FAILED", {})
    spec = UniformQuantizer(group_size=32).fused_spec(4)
    x = _data(0, 8, 64)
    with caplog.at_level(logging.WARNING, logger=FT.__name__):
        assert FT.encode(spec, x, None, 4, 32) is None
        assert FT.encode(spec, x, None, 4, 32) is None
    assert len(calls) == 1 and len(FT.FAILED) == 1 and "PassManager" in caplog.text
    assert FT.encode(UniformQuantizer(group_size=32).fused_spec(3), x, None, 3, 32) is None  # another width
    assert len(calls) == 2
    monkeypatch.setattr(FT, "STRICT", True)
    with pytest.raises(RuntimeError, match="PassManager"):
        FT.encode(UniformQuantizer(group_size=32).fused_spec(2), x, None, 2, 32)


class _Grid:
    """``kernel[grid](...)`` of a stand-in kernel."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __getitem__(self, grid):
        return self.fn


def test_switch_governs_the_triton_backend(triton_cpu: Ran) -> None:
    q = UniformQuantizer(group_size=32)
    x = _data(0, 8, 64)
    with fused.using(False):
        q.decode(q.encode(x, 4))
    with fused.reference():
        q.decode(q.encode(x, 4))
    assert (triton_cpu.encoded, triton_cpu.fell_back, triton_cpu.decoded) == (0, 0, 0)
    q.decode(q.encode(x, 4))
    assert (triton_cpu.encoded, triton_cpu.decoded) == (1, 1)


def test_interpreted_copy_leaves_the_process_compiled() -> None:
    assert FT.INTERPRETED and not fused_triton.INTERPRETED
    assert isinstance(fused_triton.K.encode_kernel, triton.runtime.jit.JITFunction)
    assert isinstance(FT.K.encode_kernel, triton.runtime.interpreter.InterpretedFunction)
    assert "TRITON_INTERPRET" not in os.environ or os.environ["TRITON_INTERPRET"] != "1"
    assert fused_triton.interpreted() is FT


# -------------------------------------------------------------------------- compiled for a GPU
_PTRS = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*i16"}
_COMPILE = [  # (kernel, pointer/int argument types, constexprs): the layouts most likely to trip the compiler
    ("encode_kernel", ("fp16", "u8", "fp32", "i16", "i16", "u8", "u8"),
     dict(XDT=1, METHOD=0, SYM=False, HAS_KEEP=False, BITS=4, P=128, LOG_P=7, BR=16, PACK=True)),
    ("encode_kernel", ("bf16", "u8", "fp32", "i16", "i16", "u8", "u8"),
     dict(XDT=2, METHOD=1, SYM=False, HAS_KEEP=True, BITS=8, P=64, LOG_P=6, BR=32, PACK=False)),
    ("encode_kernel", ("fp32", "u8", "fp32", "i16", "i16", "u8", "u8"),
     dict(XDT=0, METHOD=0, SYM=True, HAS_KEEP=False, BITS=1, P=1, LOG_P=0, BR=2048, PACK=False)),
    ("adaptive_kernel", ("fp16", "u8", "fp32", "i16", "u8", "u8"),
     dict(XDT=1, HAS_KEEP=False, BITS=1, ITERS=2, P=128, LOG_P=7, BR=16, PACK=True)),
    ("adaptive_kernel", ("fp32", "u8", "fp32", "i16", "u8", "u8"),
     dict(XDT=0, HAS_KEEP=True, BITS=8, ITERS=2, P=8, LOG_P=3, BR=8, PACK=False)),
    ("decode_kernel", ("u8", "fp16", "fp16", "fp32", "bf16", "i64"),
     dict(METHOD=2, SYM=False, BITS=8, ODT=2, HAS_ROWS=True, P=128, BR=16)),
    ("decode_kernel", ("u8", "fp16", "fp16", "fp32", "fp16", "i64"),
     dict(METHOD=1, SYM=False, BITS=3, ODT=1, HAS_ROWS=False, P=32, BR=64)),
    ("pack_kernel", ("u8", "u8"), dict(BITS=5, BLK=512)),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "kernel, ptrs, consts", _COMPILE, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(_COMPILE)]
)
def test_kernels_compile_for_a_gpu(kernel: str, ptrs: tuple[str, ...], consts: dict) -> None:
    """The kernels through Triton's whole GPU pipeline down to sm_90 machine code (the wheel
    ships ptxas; no GPU needed): the interpreter accepts code the compiler rejects (a constexpr
    reassigned in an unrolled loop, a gather whose index axis is 32 times its source's). And
    no FMA in the PTX: every launch passes ``enable_fp_fusion=False``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(fused_triton.K, kernel)
    names = [a for a in fn.arg_names if a not in consts]
    types_ = [_PTRS.get(t, f"*{t}") for t in ptrs] + ["i32"] * (len(names) - len(ptrs))
    sig = {a: types_[names.index(a)] if a in names else "constexpr" for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
    ptx = out.asm["ptx"]
    assert "fma.rn.f32" not in ptx
    if kernel == "encode_kernel":
        assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx


# -------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["uniform", "uniform_sym", "normal", "adaptive"])
def test_cuda_matches_cpu_reference(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled kernels on a GPU: CUDA encode == CPU reference encode, bit for bit, and
    CUDA decode == CPU reference decode, over widths, groupings, outliers, dtypes and rows."""
    calls = []
    real_encode, real_decode = fused_triton.encode, fused_triton.decode
    monkeypatch.setattr(
        fused_triton, "encode", lambda *a, **k: calls.append(real_encode(*a, **k) is not None)
    )
    monkeypatch.setattr(fused_triton, "decode", lambda *a, **k: calls.append(real_decode(*a, **k)))
    with fused.using(True):
        for group, ratio, (n, d), dtype in [
            (None, 0.0, (37, 96), torch.float32),
            (32, 0.1, (37, 96), torch.float32),  # outliers: no fp16 ties for topk to order
            (40, 0.0, (33, 96), torch.bfloat16),
            (128, 0.0, (4099, 192), torch.float16),
            (32, 0.0, (7, 100), torch.float32),
        ]:
            q = METHODS[method](group, ratio)
            x = _data(n + d, n, d, dtype)
            for bits in [*range(1, 9), torch.randint(1, 9, (n,), generator=torch.Generator().manual_seed(n))]:
                gq = q.encode(x.cuda(), bits.cuda() if isinstance(bits, torch.Tensor) else bits)
                rq = q.encode_reference(x, bits)
                cpu = type(gq)(gq.n_units, gq.unit_size)
                cpu.parts = [
                    type(p)(p.bits, p.n_units, p.codes.cpu(), {k: v.cpu() for k, v in p.meta.items()})
                    for p in gq.parts
                ]
                for name in ("unit_bits", "outlier_values", "outlier_index"):
                    t = getattr(gq, name)
                    setattr(cpu, name, None if t is None else t.cpu())
                assert_same(cpu, rq)
                for odt in (torch.float32, torch.float16, torch.bfloat16):
                    assert torch.equal(q.decode(gq, odt).cpu(), q.decode_reference(cpu, odt))
    assert calls and all(calls)  # the kernels ran: every encode and decode

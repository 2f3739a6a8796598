"""Calibration (kvq.calib) and the calibrated codebooks of ``method=nuq``: windows disjoint from
the evaluated ones, codebooks deterministic per seed and fitted only on the calibration windows,
the codebook memory formula equal to what is held and amortised into ``kv/bits_per_element``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kvq.alloc import FixedBits
from kvq.calib import Calibration, calibrate, clear_calibration_cache
from kvq.data import LocalText, PyDoc
from kvq.models import TinyRandomLlama
from kvq.protocols import KVSetup, rope_of
from kvq.quant import NUQQuantizer
from kvq.results import read_result
from kvq.run import run

from .conftest import TINY

SEQ = 32


def numbered_text(path: Path, n: int, tag: str = "w") -> Path:
    """A text of ``n`` unique words (``w000001 w000002 ...``): every 16 bytes hold a unique number."""
    path.write_text("\n".join(" ".join(f"{tag}{i:06d}" for i in range(j, j + 8)) for j in range(0, n, 8)))
    return path


def grams(rows: torch.Tensor, n: int = 16) -> set[tuple[int, ...]]:
    out = set()
    for r in rows.tolist():
        out.update(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
    return out


@pytest.fixture(scope="module")
def tiny():
    return TinyRandomLlama(n_layers=2, vocab_size=512).load()


def test_calibration_on_the_evaluation_text_uses_only_tokens_after_the_evaluated_windows(
    tiny, tmp_path
) -> None:
    src = LocalText(path=str(numbered_text(tmp_path / "t.txt", 400)))
    src.seq_len, src.max_windows = SEQ, 6
    evaluated = src.datamodule(tiny.tokenizer).windows
    cal = Calibration(text="data", windows=8, seed=3)
    rows = cal.batches(tiny.tokenizer, src)
    assert rows.shape == (8, SEQ)
    assert not grams(rows) & grams(evaluated)  # not one 16-token span in common
    # the seed picks other windows among the allowed ones, still disjoint
    other = Calibration(text="data", windows=8, seed=4).batches(tiny.tokenizer, src)
    assert not torch.equal(other, rows) and not grams(other) & grams(evaluated)


def test_too_short_a_calibration_text_is_one_line(tiny, tmp_path) -> None:
    src = LocalText(path=str(numbered_text(tmp_path / "t.txt", 40)))
    src.seq_len, src.max_windows = SEQ, 2
    with pytest.raises(ValueError, match="lower calib.windows") as e:
        Calibration(text="data", windows=50).batches(tiny.tokenizer, src)
    assert "\n" not in str(e.value)


def test_an_overlap_the_config_decides_is_refused(compose) -> None:
    from kvq.validate import validate

    rep = validate(compose([*TINY, "method=nuq", "calib=data", "data.max_windows=null"]))
    assert not rep.ok and [v.rule for v in rep.violations] == ["calib-overlap"]
    assert validate(compose([*TINY, "method=nuq", "calib=data"])).ok


def _setup(tiny, method, bits=None, **knobs) -> KVSetup:
    return KVSetup(
        method,
        bits or FixedBits(3),
        2,
        model_config=tiny.model.config,
        rope=rope_of(tiny.model),
        granularity="head",
        knobs=knobs,
    )


def _books(tiny, data_src, calib: Calibration, **kw) -> dict:
    clear_calibration_cache()  # statistics are collected again, not reused from another test
    q = NUQQuantizer(**kw)
    assert calibrate(_setup(tiny, q), calib, tiny.model, tiny.tokenizer, data_src)
    return q.calib_state()["books"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_codebooks_are_deterministic_per_seed(tiny) -> None:
    data = PyDoc()
    data.seq_len, data.max_windows = SEQ, 2
    cal = Calibration(windows=3, seq_len=SEQ, seed=0)
    first = _books(tiny, data, cal)
    assert first and all(b.shape[-1] == 8 for b in first.values())  # 3 bits: 8 levels
    assert _same(first, _books(tiny, data, cal))
    assert not _same(first, _books(tiny, data, Calibration(windows=3, seq_len=SEQ, seed=1)))


def test_codebooks_are_fitted_on_the_calibration_windows_only(tiny, tmp_path) -> None:
    """Another evaluation text (same calibration) gives the same codebooks; another calibration
    text gives others."""
    cal = Calibration(
        text="local", path=str(numbered_text(tmp_path / "cal.txt", 300)), windows=3, seq_len=SEQ
    )
    books = []
    for name in ("a", "b"):
        ev = LocalText(path=str(numbered_text(tmp_path / f"{name}.txt", 300, tag=name)))
        ev.seq_len, ev.max_windows = SEQ, 2
        books.append(_books(tiny, ev, cal))
    assert _same(*books)
    other = Calibration(
        text="local", path=str(numbered_text(tmp_path / "x.txt", 300, tag="q")), windows=3, seq_len=SEQ
    )
    assert not _same(books[0], _books(tiny, ev, other))


def test_calibrated_codebooks_beat_the_default_ones_on_held_out_keys(tiny) -> None:
    data = PyDoc()
    data.seq_len, data.max_windows = SEQ, 2
    clear_calibration_cache()
    fitted = NUQQuantizer(key_weighting="uniform")
    setup = _setup(tiny, fitted)
    calibrate(setup, Calibration(windows=4, seq_len=SEQ), tiny.model, tiny.tokenizer, data)
    # keys of the evaluated windows (held out from calibration), as the cache sees them
    from kvq.calib import collect

    held = collect(tiny.model, data.datamodule(tiny.tokenizer).windows, rope=setup.rope)
    units, _ = held.units(0, "key", setup, fitted.for_layer(0, "key"))
    default = NUQQuantizer().for_layer(0, "key")

    def err(q) -> float:
        return float((q.fake_quant(units, 2) - units).pow(2).mean())

    assert err(fitted.for_layer(0, "key")) < err(default)


@pytest.mark.parametrize(
    ("extra", "key_rows", "value_rows"),
    [
        # per-channel keys in token groups: one codebook row per channel of the head
        (["kv.key_axis=channel", "kv.key_group=8", "granularity=head"], 16, 1),
        # per-token keys: one row per feature of the unit (a head: 16, a layer: 2 heads x 16)
        (["granularity=head"], 16, 1),
        (["granularity=layer"], 32, 1),
        (["granularity=head", "method.per_channel_keys=false"], 1, 1),
    ],
    ids=["channel-keys", "head", "layer", "shared-keys"],
)
def test_codebook_bytes_and_the_amortised_bits(compose, tmp_path, extra, key_rows, value_rows) -> None:
    """``kv/codebook_bytes`` = 2 bytes x levels x rows of every codebook used (2 layers, K3/V3), and
    ``kv/bits_per_element`` = 8 (cache bytes of every window + codebook bytes) / elements."""
    run(compose([*TINY, "method=nuq", "bits=b3", "calib.windows=2", *extra]), out_dir=tmp_path)
    m = read_result(tmp_path)["metrics"]
    assert m["kv/codebook_bytes"] == 2 * 2 * 8 * (key_rows + value_rows)
    n = m["test/windows"]
    elements = m["kv/bytes_fp16"] * n / 2
    assert m["kv/bits_per_element"] == pytest.approx(
        8 * (m["kv/bytes"] * n + m["kv/codebook_bytes"]) / elements
    )
    assert m["kv/cache_bits_per_element"] == pytest.approx(8 * m["kv/bytes"] / (m["kv/bytes_fp16"] / 2))
    assert m["kv/bits_per_element"] > m["kv/cache_bits_per_element"] and math.isfinite(m["test/ppl"])


def test_the_sensitivity_is_measured_where_the_protocol_sees_quantized_kv() -> None:
    """Prefill: the continuation's queries see the prefix quantized (not its sinks or newest
    residual tokens), the prefix's own queries see nothing quantized; protocols without a
    prefix/continuation split (passkey) calibrate in the cache's streaming order."""
    from kvq.calib import visibility
    from kvq.protocols import Passkey, Prefill
    from kvq.quant import UniformQuantizer

    kv = KVSetup(UniformQuantizer(), FixedBits(4), 2, knobs={"sinks": 1, "residual": 2})
    m = visibility(kv, Prefill(prefix_len=6), 10)
    expect = torch.zeros(10, 10, dtype=torch.bool)
    expect[6:, 1:4] = True  # keys 1..3: after the sink, before the prefix's newest 2
    assert torch.equal(m, expect)
    streaming = visibility(kv, None, 10)
    assert torch.equal(visibility(kv, Passkey(), 10), streaming)
    assert not torch.equal(streaming, m) and not streaming[:, 0].any()  # the sink: never quantized


def test_a_run_calibrates_for_its_own_protocol(compose, tmp_path, monkeypatch) -> None:
    import kvq.calib as calib_mod

    seen = []
    real = calib_mod.visibility
    monkeypatch.setattr(calib_mod, "visibility", lambda s, p, T: seen.append(p) or real(s, p, T))
    clear_calibration_cache()
    run(compose([*TINY, "bits=budget", "calib.windows=2", "eval=prefill"]), out_dir=tmp_path)
    assert read_result(tmp_path)["status"] == "ok"
    assert [type(p).__name__ for p in seen] == ["Prefill"]

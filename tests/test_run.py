"""End-to-end runs on the tiny random model: every protocol, result.json, W&B files, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvq.results import read_result
from kvq.run import KVQError, run

from .conftest import TINY, train_eval_cli, wandb_summary

METRICS = (
    "test/ppl",
    "test/nll",
    "test/tokens",
    "kv/bits_per_element",
    "kv/bytes",
    "kv/bytes_fp16",
    "kv/compression",
    "mem/peak_bytes",
    "time/eval_s",
    "time/tokens_per_s",
)


@pytest.mark.parametrize(
    "extra",
    [
        ["eval=fakequant"],
        ["eval=prefill", "granularity=token"],
        ["eval=decode", "data.seq_len=12", "data.max_windows=1"],
        ["bits=attn", "eval=fakequant"],
        ["bits=attn", "eval=prefill", "granularity=token", "method=normal"],
        ["method=adaptive", "grouping=g32", "granularity=layer"],
        ["method=none"],
    ],
    ids=lambda x: " ".join(x),
)
def test_end_to_end_tiny(compose, tmp_path: Path, extra: list[str]) -> None:
    cfg = compose([*TINY, *extra])
    ppl = run(cfg, out_dir=tmp_path)
    rec = read_result(tmp_path)
    assert rec["status"] == "ok" and rec["reason"] is None
    assert set(METRICS) <= set(rec["metrics"])
    m = rec["metrics"]
    assert ppl == m["test/ppl"] and math.isfinite(ppl) and ppl > 1
    assert m["test/ppl"] == pytest.approx(math.exp(m["test/nll"]))
    assert m["kv/compression"] == pytest.approx(m["kv/bytes_fp16"] / m["kv/bytes"])
    assert rec["config"]["model"]["_target_"] == "kvq.models.TinyRandomLlama"
    assert {"torch", "transformers", "kvq", "python"} <= set(rec["versions"])
    assert "bits/key/layer_00" in m and "bits/value/layer_01" in m


def test_fixed_bits_memory_matches_the_formula(compose, tmp_path: Path) -> None:
    run(compose([*TINY, "bits=b4", "granularity=head"]), out_dir=tmp_path)
    m = read_result(tmp_path)["metrics"]
    # tiny model: head_dim 16, per-head units, one group: 4 bits + zero/scale (32 bits) per 16 elements
    assert m["kv/bits_per_element"] == pytest.approx(4 + 32 / 16)
    assert m["test/tokens"] == 2 * 31


def test_quantization_changes_perplexity_and_baseline_does_not(compose, tmp_path: Path) -> None:
    ppl_fp = run(compose([*TINY, "method=none", "kv.fp_dtype=null"]), out_dir=tmp_path / "a")
    ppl_b8 = run(compose([*TINY, "bits=b8"]), out_dir=tmp_path / "b")
    ppl_b2 = run(compose([*TINY, "bits=b2"]), out_dir=tmp_path / "c")
    assert abs(ppl_b8 - ppl_fp) < abs(ppl_b2 - ppl_fp)
    assert (
        read_result(tmp_path / "a")["metrics"]["kv/bits_per_element"] == 32
    )  # fp32 tiny model, fp_dtype=null


def test_invalid_combination_is_skipped_before_loading(compose, tmp_path: Path, monkeypatch) -> None:
    from kvq import models

    def boom(*a, **k):
        raise AssertionError("the model must not load for a skipped run")

    monkeypatch.setattr(models.TinyRandomLlama, "load", boom)
    ppl = run(compose([*TINY, "bits=attn", "method=adaptive"]), out_dir=tmp_path)
    rec = read_result(tmp_path)
    assert math.isnan(ppl) and rec["status"] == "skipped"
    assert "attn" in rec["reason"] and "adaptive" in rec["reason"] and "\n" not in rec["reason"]
    assert rec["metrics"] == {}


def test_missing_data_path_is_one_line_and_recorded(compose, tmp_path: Path) -> None:
    with pytest.raises(KVQError, match=r"data.path is required for data=local") as e:
        run(compose([*TINY, "data=local"]), out_dir=tmp_path)
    assert "\n" not in str(e.value)
    assert read_result(tmp_path)["status"] == "failed"


def test_model_not_available_offline_names_the_embedded_model(compose, tmp_path: Path) -> None:
    with pytest.raises(KVQError, match="model=smollm2_135m") as e:
        run(compose(["model=llama2_7b", "logger=none"]), out_dir=tmp_path)
    assert "\n" not in str(e.value)
    assert "not available offline" in str(e.value)
    assert read_result(tmp_path)["status"] == "failed"


def test_cuda_requested_but_absent(compose, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present on this machine")
    with pytest.raises(KVQError, match="no CUDA device is available: use accelerator=auto") as e:
        run(compose([*TINY, "accelerator=cuda"]), out_dir=tmp_path)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- the real CLI
@pytest.mark.slow
def test_cli_run_with_wandb_offline_files(tmp_path: Path) -> None:
    out = train_eval_cli(
        [*TINY[:1], "logger=wandb", "data.seq_len=32", "data.max_windows=2", f"hydra.run.dir={tmp_path}"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "test/ppl" in out.stdout
    rec = read_result(tmp_path)
    assert rec["status"] == "ok"
    (run_dir,) = list((tmp_path / "wandb").glob("offline-run-*"))
    info = json.dumps(wandb_summary(run_dir))
    assert "test/ppl" in info and "kv/bits_per_element" in info
    assert str(round(rec["metrics"]["test/ppl"], 3))[:5] in info


@pytest.mark.slow
def test_cli_skipped_run_exits_zero_with_wandb_tag(tmp_path: Path) -> None:
    out = train_eval_cli(
        ["model=tiny_random", "logger=wandb", "bits=attn", "method=adaptive", f"hydra.run.dir={tmp_path}"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "skipped" in out.stdout and "adaptive" in out.stdout
    assert read_result(tmp_path)["status"] == "skipped"
    (run_dir,) = list((tmp_path / "wandb").glob("offline-run-*"))
    info = json.dumps(wandb_summary(run_dir))
    assert "skipped" in info and "skip_reason" in info


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["method=foo"], 2, "Available options in 'method'"),
        (["bits.key_bits=four"], 2, "could not be converted to Integer"),
        (["method.grop=1"], 2, "Key 'grop' not in"),
        (["model=tiny_random", "logger=none", "data=local"], 1, "kvq: error: data.path is required"),
    ],
)
def test_cli_bad_input_exit_codes(tmp_path: Path, args: list[str], code: int, needle: str) -> None:
    out = train_eval_cli([*args, f"hydra.run.dir={tmp_path}"], tmp_path)
    assert out.returncode == code, (out.returncode, out.stderr[-2000:])
    assert needle in out.stderr
    assert "Traceback" not in out.stderr

"""eval=generate: tokens/s and memory of model.generate per cache (kvq, DynamicCache, quanto, HQQ)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kvq.alloc import FixedBits
from kvq.protocols import Generate, KVSetup
from kvq.protocols.generation import point_label
from kvq.quant import UniformQuantizer
from kvq.results import read_result
from kvq.run import run

from .conftest import TINY

GRID = ["eval=generate", "eval.batch_sizes=[1,2]", "eval.prompt_lens=[16]", "eval.new_tokens=[4]"]


def test_end_to_end_tiny(compose, tmp_path: Path) -> None:
    ppl = run(compose([*TINY, *GRID, "bits=b4"]), out_dir=tmp_path)
    rec = read_result(tmp_path)
    assert rec["status"] == "ok" and math.isnan(ppl)
    m = rec["metrics"]
    for cache in ("kvq", "dynamic", "hf_quanto", "hf_hqq"):
        for B in (1, 2):
            pre = f"test/gen/{cache}/{point_label(B, 16, 4)}"
            assert m[f"{pre}/tokens_per_s"] > 0 and m[f"{pre}/prefill_s"] > 0 and m[f"{pre}/kv_bytes"] > 0
        assert m[f"test/gen/{cache}/tokens_per_s"] > 0
    # what each cache holds after 2 x (16 + 4 - 1) tokens: fp32 DynamicCache on the tiny model
    assert m["test/gen/dynamic/kv_bytes"] == 2 * 2 * 2 * 2 * 19 * 16 * 4  # K+V, layers, B, heads, T, d, bytes
    assert m["test/gen/kvq/kv_bytes_vs_dynamic"] < 0.25  # 4 bits + fp16 scales vs fp32
    assert m["test/gen/kvq/speed_vs_dynamic"] > 0 and m["test/tokens_per_s"] == m["test/gen/kvq/tokens_per_s"]
    assert m["bits/key/mean"] == 4.0 and m["kv/compression"] > 1
    assert "test/ppl" not in m and not any(k.endswith("peak_bytes") for k in m if k.startswith("test/gen"))


def test_exactly_the_requested_tokens_are_generated(tiny_model) -> None:
    proto = Generate(batch_sizes=[3], prompt_lens=[10], new_tokens=[5], caches=["kvq", "dynamic"])
    from kvq.data import PyDoc

    dm = proto.datamodule(PyDoc(), tiny_model.tokenizer)
    (batch,) = list(dm.test_dataloader())
    assert batch["input_ids"].shape == (3, 10)
    kv = KVSetup(UniformQuantizer(), FixedBits(4), 2, model_config=tiny_model.model.config)
    with torch.inference_mode():
        r = proto.score(tiny_model.model, batch["input_ids"], kv)
    assert set(r.caches) == {"kvq", "dynamic"}
    for g in r.caches.values():
        assert g.new_tokens == 15 and g.seconds >= g.decode_s > 0 and g.prefill_s > 0
    m = proto.aggregate([r], 1.0)
    assert (
        m["test/gen/kvq/decode_tokens_per_s"] > 0
        and m["test/gen/kvq/b3_p10_n5/kv_bytes"] == r.caches["kvq"].kv_bytes
    )


def test_knobs_and_the_validator(compose) -> None:
    from kvq.models import TinyRandomLlama
    from kvq.validate import validate

    with pytest.raises(ValueError, match="eval.caches"):
        Generate(caches=["paged"])
    with pytest.raises(ValueError, match="eval.new_tokens"):
        Generate(new_tokens=[0])
    meta = TinyRandomLlama().meta()
    assert validate(compose([*TINY, *GRID]), meta).ok
    rep = validate(compose([*TINY, *GRID, "granularity=token"]), meta)
    assert not rep.ok and "token-needs-whole-cache" in rep.reason()
    rep = validate(compose([*TINY, "eval=generate", "eval.prompt_lens=[2000]", "eval.new_tokens=[64]"]), meta)
    assert not rep.ok and "protocol-beyond-context" in rep.reason()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_memory_on_gpu(compose, tmp_path: Path) -> None:
    run(compose([*TINY, *GRID, "accelerator=gpu"]), out_dir=tmp_path)
    m = read_result(tmp_path)["metrics"]
    for cache in ("kvq", "dynamic"):
        assert m[f"test/gen/{cache}/peak_bytes"] >= m[f"test/gen/{cache}/peak_extra_bytes"] > 0


def test_report_has_a_generation_section(tmp_path: Path) -> None:
    from kvq.report import collect, generation_table, write_report
    from kvq.results import write_result

    m = {"time/eval_s": 1.0, "test/tokens_per_s": 10.0}
    for cache, tps, kvb in (("kvq", 10.0, 1000.0), ("dynamic", 20.0, 4000.0)):
        m[f"test/gen/{cache}/b1_p16_n4/tokens_per_s"] = tps
        m[f"test/gen/{cache}/tokens_per_s"] = tps
        m[f"test/gen/{cache}/kv_bytes"] = kvb
    m["test/gen/kvq/speed_vs_dynamic"], m["test/gen/kvq/kv_bytes_vs_dynamic"] = 0.5, 0.25
    ch = {"method": "uniform", "grouping": "none", "bits": "b4", "granularity": "layer"}
    ch |= {"model": "tiny_random", "data": "pydoc", "eval": "generate"}
    write_result(tmp_path / "run", {"status": "ok", "name": "g", "choices": ch, "metrics": m})
    records = collect([tmp_path / "run"])
    df = generation_table(records)
    assert set(zip(df["cache"], df["point"])) == {
        ("kvq", "b1_p16_n4"),
        ("kvq", "all"),
        ("dynamic", "b1_p16_n4"),
        ("dynamic", "all"),
    }
    files = write_report(records, tmp_path / "out")
    md = files["md"].read_text()
    assert "## Generation cost" in md and "| kvq | all | 10.0 |" in md and "| 0.50 | 0.250 |" in md
    assert files["generation_csv"].exists() and "heatmap" not in files

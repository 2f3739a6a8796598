"""eval=lm_eval: lm-evaluation-harness with kvq's quantized cache in the model's forward, on a tiny
local multiple-choice task (YAML + JSONL written to tmp_path: offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvq.alloc import FixedBits
from kvq.protocols import KVSetup
from kvq.protocols.harness import quantized_forward, task_metrics
from kvq.quant import FullPrecision, UniformQuantizer
from kvq.results import read_result
from kvq.run import run

from .conftest import TINY

TASK = "kvq_tiny_mc"
ROWS = [
    {"question": "What color is the sky on a clear day?", "choices": [" blue", " green", " red"], "label": 0},
    {"question": "How many legs does a dog have?", "choices": [" three", " four", " ten"], "label": 1},
    {"question": "What is two plus two?", "choices": [" four", " five", " six"], "label": 0},
    {"question": "Which animal says meow?", "choices": [" a cow", " a dog", " a cat"], "label": 2},
]


def write_task(folder: Path) -> Path:
    """A local multiple-choice task lm-eval reads offline: ``<folder>/kvq_tiny_mc.yaml`` + JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{label}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def test_the_quantized_cache_is_put_into_the_forward_and_taken_out_again(tiny_model) -> None:
    model = tiny_model.model
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    kv = KVSetup(UniformQuantizer(), FixedBits(2), 2, model_config=model.config)
    with torch.inference_mode():
        fp = model(ids).logits
        expected = model(ids, cache=kv.cache(), use_cache=True).logits
        with quantized_forward(model, kv) as use:
            inside = model(ids).logits  # as the harness calls it: no cache
            gen = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        after = model(ids).logits
    assert torch.equal(inside, expected) and not torch.allclose(inside, fp)
    assert torch.equal(after, fp) and "forward" not in vars(model) and "generate" not in vars(model)
    assert use.forwards == 1 and use.generates == 1 and gen.shape == (1, 22)
    assert use.kv_elements > 0 and use.bits[0]["key"] == [2.0, 2.0]


def test_task_metrics_from_lm_eval_results() -> None:
    res = {
        "results": {
            "piqa": {"alias": "piqa", "acc,none": 0.6, "acc_stderr,none": 0.01, "acc_norm,none": 0.62},
            "gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": "N/A"},
        },
        "n-samples": {"piqa": {"original": 1838, "effective": 100}},
    }
    m = task_metrics(res, ["piqa", "gsm8k"])
    assert m == {
        "test/piqa/acc": 0.6,
        "test/piqa/acc_stderr": 0.01,
        "test/piqa/acc_norm": 0.62,
        "test/gsm8k/exact_match/strict-match": 0.1,
        "test/piqa/samples": 100.0,
        "test/lm_eval_acc": 0.6,
    }


@pytest.mark.slow
def test_lm_eval_on_a_tiny_local_task(compose, tmp_path: Path) -> None:
    tasks = write_task(tmp_path / "tasks")
    overrides = [*TINY, "eval=lm_eval", f"eval.tasks=[{TASK}]", f"eval.include_path={tasks}"]
    run(compose([*overrides, "bits=b4"]), out_dir=tmp_path / "q")
    rec = read_result(tmp_path / "q")
    assert rec["status"] == "ok", rec["reason"]
    m = rec["metrics"]
    assert 0 <= m[f"test/{TASK}/acc"] <= 1 and m[f"test/{TASK}/acc_stderr"] > 0
    assert m[f"test/{TASK}/samples"] == len(ROWS) and m["test/lm_eval_acc"] == m[f"test/{TASK}/acc"]
    assert m["test/lm_eval_forwards"] >= len(ROWS)  # one forward per request, each with kvq's cache
    assert m["bits/key/mean"] == 4.0 and m["kv/compression"] > 1
    assert "test/ppl" not in m
    from kvq.report import collect, write_report

    files = write_report(collect([tmp_path]), tmp_path / "report")
    md = files["md"].read_text()
    assert "## Task accuracy (lm-evaluation-harness)" in md and TASK in md and "±" in md
    assert files["tasks_csv"].exists()


def test_validator_rejects_whole_model_units_with_the_harness(compose) -> None:
    from kvq.validate import validate

    rep = validate(compose([*TINY, "eval=lm_eval", "granularity=token"]))
    assert not rep.ok and "token-needs-whole-cache" in rep.reason()
    rep = validate(compose([*TINY, "eval=lm_eval", "method=hf_hqq"]))  # sees its own K/V unquantized
    assert not rep.ok and "peer-needs-prefill" in rep.reason()


def test_full_precision_cache_in_the_forward_changes_nothing(tiny_model) -> None:
    model = tiny_model.model
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    kv = KVSetup(FullPrecision(), FixedBits(4), 2, model_config=model.config, knobs={"fp_dtype": None})
    with torch.inference_mode():
        fp = model(ids).logits
        with quantized_forward(model, kv):
            inside = model(ids).logits
    assert torch.allclose(inside, fp, atol=1e-5)

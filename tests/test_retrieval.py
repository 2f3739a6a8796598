"""Long-context retrieval (eval=passkey, eval=needle): prompts, the scorer, runs, the validator,
the report's heatmap; the embedded model retrieving in full precision (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kvq.models import byte_tokenizer
from kvq.protocols import KVSetup, Needle, Passkey
from kvq.protocols.retrieval import depth_label, score_answer
from kvq.results import read_result
from kvq.run import run

from .conftest import TINY


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_score_answer_on_known_answers() -> None:
    assert score_answer("71432", " 71432. Remember it.")
    assert score_answer("71432", "71432")
    assert score_answer("4817203", " is: 4817203.\n")
    assert not score_answer("71432", " 7143")  # a prefix is not the key
    assert not score_answer("71432", " 171432")  # nor a number containing it
    assert not score_answer("71432", " 12345, no: 71432")  # the first number counts
    assert not score_answer("71432", " I do not know")
    assert not score_answer("71432", "")
    assert depth_label(0.25) == "25" and depth_label(0.0) == "0" and depth_label(1.0) == "100"


def test_passkey_prompts_are_deterministic_per_seed(tok) -> None:
    a = Passkey(lengths=[600, 1200], depths=[0.0, 0.5, 1.0], trials=2, seed=0).prompts(tok)
    b = Passkey(lengths=[600, 1200], depths=[0.0, 0.5, 1.0], trials=2, seed=0).prompts(tok)
    c = Passkey(lengths=[600, 1200], depths=[0.0, 0.5, 1.0], trials=2, seed=1).prompts(tok)
    assert len(a) == 2 * 3 * 2
    assert all(torch.equal(x.ids, y.ids) and x.answer == y.answer for x, y in zip(a, b))
    assert [x.answer for x in a] != [x.answer for x in c]
    assert len({x.answer for x in a}) > 1  # every prompt draws its own key
    for p in a:
        text = tok.decode(p.ids)
        assert len(p.ids) <= p.length and text.count(p.answer) == 2
        assert text.endswith("What is the pass key? The pass key is")
        before = text[: text.index(f" The pass key is {p.answer}")].count(Passkey.FILLER)
        assert before == round(p.depth * text.count(Passkey.FILLER))  # the key sits at its depth


def test_needle_prompts_are_exact_length_deterministic_and_after_a_sentence_end(tok) -> None:
    from kvq.data import PyDoc

    hay = PyDoc().datamodule(tok).token_ids
    proto = Needle(lengths=[700, 1500], depths=[0.0, 0.3, 1.0], trials=2, seed=3)
    a = [proto.prompt(tok, hay, n, d, t) for n in proto.lengths for d in proto.depths for t in range(2)]
    b = [proto.prompt(tok, hay, n, d, t) for n in proto.lengths for d in proto.depths for t in range(2)]
    assert all(torch.equal(x.ids, y.ids) for x, y in zip(a, b))
    for p in a:
        text = tok.decode(p.ids)
        assert len(p.ids) == p.length and len(p.answer) == 7
        i = text.index("One of the special magic numbers for ")
        assert text[i:].split("\n", 1)[0].endswith(f"is: {p.answer}.")
        assert text[i - 1] == "\n" and text[i - 2] in ".\n"  # after a sentence or line end of the text
    assert len({tok.decode(p.ids[50:150]) for p in a}) > 1  # trials draw other haystack offsets


def test_prompts_too_short_for_the_fixed_text_fail_in_one_line(tok) -> None:
    with pytest.raises(ValueError, match="cannot hold its fixed text"):
        Passkey(lengths=[64], depths=[0.5], trials=1).prompts(tok)
    with pytest.raises(ValueError, match=r"eval.depths"):
        Passkey(depths=[1.5])


class _Answers(torch.nn.Module):
    """Wraps the tiny model: its ``generate`` appends a fixed answer after the prompt."""

    def __init__(self, model, tok, answers: dict[int, str]) -> None:
        super().__init__()
        self.inner, self.tok, self.answers, self.calls = model, tok, answers, []

    def forward(self, *a, **k):
        return self.inner(*a, **k)

    def generate(self, ids, cache=None, **kw):
        self.calls.append((ids.shape[1], cache.get_seq_length()))
        ans = self.tok(self.answers[ids.shape[1]], add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([ids, ans], dim=1)


def test_scorer_reads_only_the_generated_tokens_after_a_quantized_prefill(tiny_model) -> None:
    from kvq.alloc import FixedBits
    from kvq.quant import UniformQuantizer

    tok = tiny_model.tokenizer
    proto = Passkey(lengths=[400, 700], depths=[0.5], trials=1)
    dm = proto.datamodule(None, tok)
    batches = [b["input_ids"] for b in dm.test_dataloader()]
    prompts = list(proto._prompts.values())
    answers = {prompts[0].ids.numel(): f" {prompts[0].answer}. Remember", prompts[1].ids.numel(): " 00000."}
    model = _Answers(tiny_model.model, tok, answers)
    kv = KVSetup(UniformQuantizer(), FixedBits(4), 2, model_config=tiny_model.model.config)
    with torch.inference_mode():
        rs = [proto.score(model, ids, kv) for ids in batches]
    assert [r.correct for r in rs] == [True, False]
    assert [c for c in model.calls] == [
        (n, n - 1) for n in (b.shape[1] for b in batches)
    ]  # prefilled but one
    assert all(r.kv_bytes > 0 and r.bits["key"] == [4.0, 4.0] for r in rs)
    m = proto.aggregate(rs, 1.0)
    assert m["test/passkey_acc"] == 0.5 and m["test/passkey_acc/len_400"] == 1.0
    assert m["test/passkey_acc/len_700/depth_50"] == 0.0 and m["kv/bits_per_element"] > 4


@pytest.mark.parametrize(
    "extra",
    [
        ["eval=passkey", "eval.lengths=[300,600]", "eval.depths=[0,1]", "eval.trials=1"],
        ["eval=needle", "eval.lengths=[400]", "eval.depths=[0.5]", "eval.trials=2", "granularity=token"],
        ["eval=passkey", "eval.lengths=[300]", "eval.depths=[0.5]", "eval.trials=1", "bits=attn"],
    ],
    ids=lambda x: " ".join(x),
)
def test_end_to_end_tiny(compose, tmp_path: Path, extra: list[str]) -> None:
    ppl = run(compose([*TINY, *extra]), out_dir=tmp_path)
    rec = read_result(tmp_path)
    assert rec["status"] == "ok" and math.isnan(ppl)
    m = rec["metrics"]
    name = extra[0].split("=")[1]
    lengths = [int(x) for x in extra[1].split("=")[1].strip("[]").split(",")]
    assert 0.0 <= m[f"test/{name}_acc"] <= 1.0
    assert all(f"test/{name}_acc/len_{n}" in m for n in lengths)
    assert all(m[f"test/{name}_tokens/len_{n}"] <= n for n in lengths)
    assert m["kv/compression"] > 1 and m["bits/key/mean"] > 0
    assert "test/ppl" not in m and "test/baseline_ppl" not in m  # no perplexity baseline for retrieval


def test_validator_knows_what_retrieval_needs(compose) -> None:
    from kvq.models import TinyRandomLlama
    from kvq.validate import validate

    meta = TinyRandomLlama().meta()  # 2048 positions
    rep = validate(compose([*TINY, "eval=passkey", "eval.lengths=[1024,4096]"]), meta)
    assert not rep.ok and "protocol-beyond-context" in rep.reason() and "2048 positions" in rep.reason()
    assert validate(compose([*TINY, "eval=needle", "eval.lengths=[1024]", "granularity=token"]), meta).ok
    ok = validate(compose([*TINY, "eval=passkey", "eval.lengths=[1024]", "method=hf_quanto"]), meta).ok
    assert ok  # a whole-cache protocol: the peers quantize the prefilled prompt


def test_report_draws_the_retrieval_heatmap(tmp_path: Path) -> None:
    from kvq.report import collect, write_report
    from kvq.results import write_result

    for i, (method, acc) in enumerate((("none", 1.0), ("uniform", 0.5))):
        m = {"test/passkey_acc": acc, "kv/bits_per_element": 16.0 if method == "none" else 4.5}
        for n in (1024, 4096):
            m[f"test/passkey_acc/len_{n}"] = acc
            for d in ("0", "50", "100"):
                m[f"test/passkey_acc/len_{n}/depth_{d}"] = acc if n == 1024 else acc / 2
        ch = {"method": method, "grouping": "none", "bits": "b4", "granularity": "layer"}
        ch |= {"model": "smollm2_135m", "data": "pydoc", "eval": "passkey"}
        write_result(
            tmp_path / "runs" / str(i), {"status": "ok", "name": f"r{i}", "choices": ch, "metrics": m}
        )
    files = write_report(collect([tmp_path / "runs"]), tmp_path / "out")
    assert files["heatmap"].name == "retrieval.png" and files["heatmap"].stat().st_size > 10_000
    md = files["md"].read_text()
    assert "## Long-context retrieval" in md and "retrieval.png" in md and "acc @ 4096" in md
    assert "| passkey | smollm2_135m | uniform | none | b4 | layer | 0.50 | 0.50 | 0.50 |" in md


@pytest.mark.slow
@pytest.mark.integration
def test_embedded_model_retrieves_the_passkey_at_1k_in_full_precision(smollm2) -> None:
    from kvq.alloc import FixedBits
    from kvq.quant import FullPrecision

    proto = Passkey(lengths=[1024], depths=[0.0, 0.5, 1.0], trials=1, seed=0)
    dm = proto.datamodule(None, smollm2.tokenizer)
    kv = KVSetup(FullPrecision(), FixedBits(4), smollm2.meta.n_layers, model_config=smollm2.model.config)
    with torch.inference_mode():
        rs = [proto.score(smollm2.model, b["input_ids"], kv) for b in dm.test_dataloader()]
    assert all(r.correct for r in rs), [(r.answer, r.output) for r in rs]

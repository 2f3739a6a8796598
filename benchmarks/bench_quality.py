"""Quality per bit: kvq's configurations and the peer baselines on the same windows, one run.

    python benchmarks/bench_quality.py [--windows 16] [--out benchmarks/results/quality]
                                       [--passkey-length 2048] [--passkey-trials 1]

SmolLM2-135M (embedded GGUF, fp32 on CPU), the first ``--windows`` windows of 512 tokens of the
WikiText-2 raw test split in ``../shared/data``. Two protocols:

* ``prefill`` — prefill 256 tokens, quantize that cache, score the next 256 (QAQ's setting, and
  the one where transformers' ``QuantizedCache`` — the peers — can be compared);
* ``fakequant`` — one forward per window, every key/value a query sees quantized (streaming-exact
  for per-channel key groups and residual windows).

Every row is also compared with the full-precision row of its protocol on the same windows and
tokens (:mod:`kvq.reference`, recorded by the ``fp16 KV`` row under ``<out>/reference/``): mean
per-token KL(p_fp || p), top-1 agreement, and the paired 95% bootstrap interval (over windows) of
Δppl %. And every configuration answers the passkey test (:class:`kvq.protocols.Passkey`: prefill,
quantize the whole cache, decode greedily) at ``--passkey-length`` tokens (the longest length the
embedded model retrieves at in full precision; 0 = skip), at depths 0, 25, 50, 75 and 100%.

Writes ``quality.json`` (one record per row: ppl, Δppl % with its interval, KL, agreement,
passkey accuracy, bits/element), ``quality.md`` (the table) and, through ``kvq.report``,
``report.md`` / ``report.csv`` / ``pareto.png``.
Memory is what the caches really hold; the peers keep their scales and zero-points in the
model's compute dtype (fp32 here), kvq keeps metadata in fp16.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from common import WIKITEXT2_TEST, eval_windows
from quality_rows import Row, kvq_rows, preset_rows, seed_rows

from kvq.alloc import AttentionAwareBits, FixedBits
from kvq.attention import register
from kvq.calib import calibrate, stored_once_bytes
from kvq.data import LocalText
from kvq.models import SmolLM2Embedded
from kvq.peers import HFHQQ, HFQuanto
from kvq.protocols import FakeQuant, KVSetup, Passkey, Prefill, rope_of
from kvq.quant import AdaptiveQuantizer, FullPrecision, UniformQuantizer
from kvq.reference import Reference, distribution_metrics
from kvq.report import write_report


def base_rows(protocol: str) -> list[Row]:
    """The peers and kvq's earlier rows (KIVI-style, QAQ-like), as before the new axes."""
    u = UniformQuantizer
    out = [
        Row(
            "fp16 KV",
            FullPrecision(),
            FixedBits(4),
            dict(method="none", grouping="none", bits="b4", granularity="layer"),
        )
    ]
    kivi = dict(key_axis="channel", key_group=32)
    if protocol == "prefill":
        out += [
            Row(
                "transformers hqq 2-bit g32",
                HFHQQ(nbits=2, q_group_size=32, residual_length=0),
                FixedBits(2),
                dict(method="hf_hqq", grouping="g32", bits="b2", granularity="head"),
            ),
            Row(
                "transformers quanto 2-bit g32 (keys per channel)",
                HFQuanto(nbits=2, q_group_size=32, residual_length=0),
                FixedBits(2),
                dict(method="hf_quanto", grouping="g32", bits="b2", granularity="head"),
            ),
            Row(
                "transformers hqq 3-bit g32",
                HFHQQ(nbits=3, q_group_size=32, residual_length=0),
                FixedBits(3),
                dict(method="hf_hqq", grouping="g32", bits="b3", granularity="head"),
            ),
            Row(
                "transformers quanto 4-bit g32",
                HFQuanto(nbits=4, q_group_size=32, residual_length=0),
                FixedBits(4),
                dict(method="hf_quanto", grouping="g32", bits="b4", granularity="head"),
            ),
            Row(
                "kvq KIVI-2: keys per channel G32, values g32",
                u(group_size=32),
                FixedBits(2),
                dict(method="uniform", grouping="g32", bits="b2", granularity="head"),
                kivi,
            ),
            Row(
                "kvq 3-bit keys per channel G32, values g32",
                u(group_size=32),
                FixedBits(3),
                dict(method="uniform", grouping="g32", bits="b3", granularity="head"),
                kivi,
            ),
            Row(
                "kvq 3-bit keys per channel G64, values g64",
                u(group_size=64),
                FixedBits(3),
                dict(method="uniform", grouping="g64", bits="b3", granularity="head"),
                dict(key_axis="channel", key_group=64),
            ),
            Row(
                "kvq K4/V2 keys per channel G64, values g64",
                u(group_size=64),
                FixedBits(4, 2),
                dict(method="uniform", grouping="g64", bits="k4v2", granularity="head"),
                dict(key_axis="channel", key_group=64),
            ),
            Row(
                "kvq K3/V2 keys per channel G64, values g64",
                u(group_size=64),
                FixedBits(3, 2),
                dict(method="uniform", grouping="g64", bits="k3v2", granularity="head"),
                dict(key_axis="channel", key_group=64),
            ),
            Row(
                "kvq K3/V2 keys per channel G128, values g128 (layer)",
                u(group_size=128),
                FixedBits(3, 2),
                dict(method="uniform", grouping="g128", bits="k3v2", granularity="layer"),
                dict(key_axis="channel", key_group=128),
            ),
            Row(
                "kvq K4/V3 keys per channel G64, values g64",
                u(group_size=64),
                FixedBits(4, 3),
                dict(method="uniform", grouping="g64", bits="k4v3", granularity="head"),
                dict(key_axis="channel", key_group=64),
            ),
            Row(
                "kvq 4-bit per token layer g64",
                u(group_size=64),
                FixedBits(4),
                dict(method="uniform", grouping="g64", bits="b4", granularity="layer"),
            ),
            Row(
                "kvq adaptive 2-bit layer g64",
                AdaptiveQuantizer(group_size=64),
                FixedBits(2),
                dict(method="adaptive", grouping="g64", bits="b2", granularity="layer"),
            ),
            Row(
                "QAQ-like: uniform, attention-aware (eps 0.002)",
                u(),
                AttentionAwareBits(),
                dict(method="uniform", grouping="none", bits="attn", granularity="head"),
            ),
            Row(
                "attention-aware, K/V targets 0.002/0.01, bridge, g64",
                u(group_size=64),
                AttentionAwareBits(
                    key_target_error=0.002, value_target_error=0.01, bridge=True, n_min=2, n_max=6
                ),
                dict(method="uniform", grouping="g64", bits="attn", granularity="layer"),
            ),
            Row(
                "kvq keys 4-bit per channel G64 + attention-aware values (bridge, eps 0.01) g64",
                u(group_size=64),
                AttentionAwareBits(fixed_key_bits=4, value_target_error=0.01, bridge=True, n_min=2, n_max=6),
                dict(method="uniform", grouping="g64", bits="attn", granularity="head"),
                dict(key_axis="channel", key_group=64),
            ),
            Row(
                "attention-aware bridge, adaptive g64",
                AdaptiveQuantizer(group_size=64),
                AttentionAwareBits(bridge=True, n_min=2, n_max=4),
                dict(method="adaptive", grouping="g64", bits="attn", granularity="layer"),
            ),
        ]
    else:
        out += [
            Row(
                "kvq 4-bit per token g32 (reference)",
                u(group_size=32),
                FixedBits(4),
                dict(method="uniform", grouping="g32", bits="b4", granularity="head"),
            ),
            Row(
                "kvq 4-bit per token layer g64",
                u(group_size=64),
                FixedBits(4),
                dict(method="uniform", grouping="g64", bits="b4", granularity="layer"),
            ),
            Row(
                "kvq KIVI-4: keys per channel G64, values g64",
                u(group_size=64),
                FixedBits(4),
                dict(method="uniform", grouping="g64", bits="b4", granularity="head"),
                dict(key_axis="channel", key_group=64),
            ),
            Row(
                "kvq KIVI-4 pre-RoPE keys G64, values g64",
                u(group_size=64),
                FixedBits(4),
                dict(method="uniform", grouping="g64", bits="b4", granularity="head"),
                dict(key_axis="channel", key_group=64, pre_rope=True),
            ),
            Row(
                "kvq 4-bit keys per channel G128, values g128 (layer)",
                u(group_size=128),
                FixedBits(4),
                dict(method="uniform", grouping="g128", bits="b4", granularity="layer"),
                dict(key_axis="channel", key_group=128),
            ),
            Row(
                "kvq 4-bit per token layer g128",
                u(group_size=128),
                FixedBits(4),
                dict(method="uniform", grouping="g128", bits="b4", granularity="layer"),
            ),
            Row(
                "kvq 3-bit keys per channel G32, values g32",
                u(group_size=32),
                FixedBits(3),
                dict(method="uniform", grouping="g32", bits="b3", granularity="head"),
                kivi,
            ),
            Row(
                "kvq KIVI-2: keys per channel G32, values g32",
                u(group_size=32),
                FixedBits(2),
                dict(method="uniform", grouping="g32", bits="b2", granularity="head"),
                kivi,
            ),
            Row(
                "kvq K4/V3 keys per channel G64, values g64",
                u(group_size=64),
                FixedBits(4, 3),
                dict(method="uniform", grouping="g64", bits="k4v3", granularity="head"),
                dict(key_axis="channel", key_group=64),
            ),
            Row(
                "QAQ-like: uniform, attention-aware (eps 0.002)",
                u(),
                AttentionAwareBits(),
                dict(method="uniform", grouping="none", bits="attn", granularity="head"),
            ),
        ]
    return out


#: the row groups ``--rows`` chooses from
ROW_GROUPS = {"base": base_rows, "kvq": kvq_rows, "seed": seed_rows, "preset": preset_rows}


def rows(protocol: str, groups: str = "base,kvq,seed,preset") -> list[Row]:
    """The fp16 row first (it records the reference), then the chosen groups in order."""
    out = base_rows(protocol)
    chosen = [g for g in groups.split(",") if g]
    unknown = sorted(set(chosen) - set(ROW_GROUPS))
    if unknown:
        raise SystemExit(
            f"benchmark: unknown --rows {','.join(unknown)} (choose from {','.join(ROW_GROUPS)})"
        )
    picked = out[:1] + (out[1:] if "base" in chosen else [])
    for g in chosen:
        if g != "base":
            picked += ROW_GROUPS[g](protocol)
    return picked


def passkey_accuracy(lm: Any, kv: KVSetup, length: int, trials: int) -> float:
    """Passkey accuracy of one configuration at ``length`` tokens (5 depths x ``trials``)."""
    proto = Passkey(lengths=[length], depths=[0.0, 0.25, 0.5, 0.75, 1.0], trials=trials, seed=0)
    dm = proto.datamodule(None, lm.tokenizer)
    with torch.inference_mode():
        rs = [proto.score(lm.model, b["input_ids"], kv) for b in dm.test_dataloader()]
    return sum(r.correct for r in rs) / len(rs)


def _cell(v: Any, spec: str) -> str:
    return "–" if v is None or not math.isfinite(v) else format(v, spec)


def quality_md(records: list[dict[str, Any]], passkey_length: int) -> str:
    """The benchmark's table: one line per row, with the distribution metrics and the passkey."""
    pk = f"passkey @ {passkey_length}" if passkey_length else "passkey"
    lines = [
        f"| protocol | configuration | ppl | Δppl % | Δppl % 95% CI | KL (nats) | top-1 agree | {pk} | bits/element |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for rec in records:
        m = rec["metrics"]
        lo, hi = m.get("test/delta_ppl_pct_lo"), m.get("test/delta_ppl_pct_hi")
        ci = (
            "–"
            if lo is None
            else f"[{lo:+.2f}, {hi:+.2f}]" + (" ○" if lo <= 0 <= hi and m.get("test/kl", 0) > 0 else "")
        )
        lines.append(
            f"| {rec['choices']['eval']} | {rec['name']} | {m['test/ppl']:.3f} | {m['test/delta_ppl_pct']:+.2f} | "
            f"{ci} | {_cell(m.get('test/kl'), '.4f')} | {_cell(m.get('test/top1_agree'), '.4f')} | "
            f"{_cell(m.get('test/passkey_acc'), '.2f')} | {m['kv/bits_per_element']:.2f} |"
        )
    lines.append("")
    lines.append(
        "KL = mean per-token KL(p_fp || p) over the full vocabulary, top-1 agree = fraction of scored tokens "
        "whose argmax is the fp argmax, both against the fp16 KV row of the same protocol on the same "
        "tokens; 95% CI = paired bootstrap over windows (2000 resamples, seed 0); ○ = contains 0."
    )
    return "\n".join(lines) + "\n"


def setup_of(row: Row, lm: Any, rope: Any) -> KVSetup:
    """The row's :class:`KVSetup`, as ``kvq.run`` builds it (rotation included)."""
    gran = row.choices["granularity"]
    return KVSetup(
        row.method,
        row.bits,
        lm.meta.n_layers,
        model_config=lm.model.config,
        rope=rope,
        granularity=gran if gran in ("head", "layer", "token") else "head",
        knobs=row.kv,
        rotation=row.rotation,
    )


def score_all(lm: Any, proto: Any, kv: KVSetup, windows: torch.Tensor) -> list[Any]:
    with torch.inference_mode():
        return [proto.score(lm.model, w.unsqueeze(0), kv) for w in windows]


def fit(row: Row, kv: KVSetup, lm: Any, proto: Any, data_src: Any) -> None:
    """Calibrate the row's fitted components (nuq's codebooks, a budget's widths) on its calib windows."""
    if row.calib is not None:
        calibrate(kv, row.calib, lm.model, lm.tokenizer, data_src, protocol=proto)


def measured_bits(lm: Any, rope: Any, proto: Any, data_src: Any, windows: torch.Tensor, row: Row) -> float:
    """Bits per element of ``row`` on the first two windows (codebooks amortised over all windows)."""
    kv = setup_of(row, lm, rope)
    fit(row, kv, lm, proto, data_src)
    proto.reference = None
    res = score_all(lm, proto, kv, windows[:2])
    once = stored_once_bytes(kv) * len(res) / len(windows)
    return 8 * (sum(x.kv_bytes for x in res) + once) / sum(x.kv_elements for x in res)


def _row_id(rec: dict[str, Any]) -> tuple[str, str]:
    return rec["choices"]["eval"], rec["name"]


def _kept_records(path: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The records of an earlier run that ``--merge`` keeps (it must match this run's knobs)."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    for knob in ("windows", "passkey_length"):
        if old.get(knob) != getattr(args, knob):
            raise SystemExit(
                f"benchmark: --merge with --{knob.replace('_', '-')}={getattr(args, knob)}, but {path} was "
                f"measured with {old.get(knob)}: use the same value or drop --merge"
            )
    return list(old["records"])


def _merged(kept: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``kept`` with each row of ``new`` in its place (same protocol and label), the rest appended."""
    fresh = {_row_id(r): r for r in new}
    out = [fresh.pop(_row_id(r), r) for r in kept]
    return out + [r for r in new if _row_id(r) in fresh]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--protocols", default="prefill,fakequant")
    ap.add_argument("--rows", default="base,kvq,seed,preset", help=f"row groups: {', '.join(ROW_GROUPS)}")
    ap.add_argument("--out", default="benchmarks/results/quality")
    ap.add_argument("--passkey-length", type=int, default=2048, help="0 = no passkey column")
    ap.add_argument("--passkey-trials", type=int, default=1, help="prompts per depth (5 depths)")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the other rows of an existing quality.json (same --windows and --passkey-length); "
        "the rows computed now replace theirs in place",
    )
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = _kept_records(out_dir / "quality.json", args) if args.merge else []
    lm = SmolLM2Embedded(dtype="float32").load(attn_implementation=register())
    windows = eval_windows(lm.tokenizer, args.windows, require_wikitext=True)
    # the evaluation text as a data source: calibration (calib=pydoc by default) keeps away from it
    data_src = LocalText(path=str(WIKITEXT2_TEST))
    data_src.seq_len, data_src.max_windows = windows.shape[1], args.windows
    rope = rope_of(lm.model)
    records = []
    passkey: dict[
        str, float
    ] = {}  # label -> accuracy (a configuration's passkey does not depend on the protocol)
    for proto_name in args.protocols.split(","):
        proto = Prefill() if proto_name == "prefill" else FakeQuant()
        base = None
        ref_dir = out_dir / "reference" / f"{proto_name}-w{args.windows}"
        for i, row in enumerate(rows(proto_name, args.rows)):
            t0 = time.perf_counter()
            if row.prepare is not None:  # e.g. match an attention-aware target error to the bits
                row = row.prepare(row, partial(measured_bits, lm, rope, proto, data_src, windows))
            kv = setup_of(row, lm, rope)
            fit(row, kv, lm, proto, data_src)
            # the first row (fp16 KV) records the fp reference, every other row compares with it
            proto.reference = Reference(ref_dir, record=i == 0)
            results = score_all(lm, proto, kv, windows)
            nll, tok = sum(r.nll for r in results), sum(r.tokens for r in results)
            nbytes, elems = sum(r.kv_bytes for r in results), sum(r.kv_elements for r in results)
            once = stored_once_bytes(kv)  # nuq's codebooks, stored once per model, amortised
            proto.reference.finish()
            ppl = math.exp(nll / tok)
            base = ppl if base is None else base
            m = {
                "test/ppl": ppl,
                "test/baseline_ppl": base,
                "test/delta_ppl": ppl - base,
                "test/delta_ppl_pct": 100 * (ppl - base) / base,
                **distribution_metrics(results, proto.reference),
                "kv/bits_per_element": 8 * (nbytes + once) / elems,
                "kv/cache_bits_per_element": 8 * nbytes / elems,
                "kv/codebook_bytes": float(once),
                "kv/compression": 2 * elems / (nbytes + once),
                **(getattr(kv.allocator, "report", None) or {}),
                "time/eval_s": time.perf_counter() - t0,
            }
            if args.passkey_length:
                if row.label not in passkey:
                    passkey[row.label] = passkey_accuracy(lm, kv, args.passkey_length, args.passkey_trials)
                m["test/passkey_acc"] = m[f"test/passkey_acc/len_{args.passkey_length}"] = passkey[row.label]
            rec = {
                "status": "ok",
                "reason": None,
                "name": row.label,
                "choices": {**row.choices, "model": "smollm2_135m", "data": "wikitext2", "eval": proto_name},
                "config": {
                    "label": row.label,
                    "kv": row.kv,
                    "bits": {"_target_": type(row.bits).__name__, "repr": repr(row.bits)},
                    "method": {
                        "_target_": f"{type(row.method).__module__}.{type(row.method).__name__}",
                        "repr": repr(row.method),
                    },
                    "rotation": repr(row.rotation),
                    "calib": repr(row.calib),
                },
                "metrics": m,
            }
            records.append(rec)
            everything = _merged(kept, records)
            print(
                f"{proto_name:9s} {row.label:55s} ppl {ppl:8.3f}  {m['test/delta_ppl_pct']:+7.2f}% "
                f"[{m.get('test/delta_ppl_pct_lo', math.nan):+.2f}, {m.get('test/delta_ppl_pct_hi', math.nan):+.2f}]  "
                f"KL {m.get('test/kl', math.nan):.4f}  top1 {m.get('test/top1_agree', math.nan):.3f}  "
                f"passkey {m.get('test/passkey_acc', math.nan):.2f}  "
                f"{m['kv/bits_per_element']:5.2f} bits/elem  ({m['time/eval_s']:.0f}s)",
                flush=True,
            )
            (out_dir / "quality.json").write_text(
                json.dumps(
                    {"windows": args.windows, "passkey_length": args.passkey_length, "records": everything},
                    indent=1,
                    default=str,
                )
            )
    records = _merged(kept, records)
    (out_dir / "quality.md").write_text(quality_md(records, args.passkey_length))
    for rec in records:  # where kvq.report says a row came from
        rec["_path"] = rec["_root"] = str(out_dir / "quality.json")
    files = write_report(records, out_dir)
    print("wrote", out_dir / "quality.json", out_dir / "quality.md", *files.values())


if __name__ == "__main__":
    main()

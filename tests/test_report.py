"""``kvq.report``: Pareto front, table, markdown/CSV/PNG report, corrupt records, CLI, W&B logging."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import pandas as pd
import pytest

from kvq.report import (
    build_table,
    collect,
    log_to_wandb,
    main,
    pareto_front,
    skipped_and_failed,
    write_report,
)

from .conftest import train_eval_cli
from .report_fixtures import grid_records, record, write_records

NAN, INF = math.nan, math.inf


# --------------------------------------------------------------------------- Pareto front
def _brute_force(points: list[tuple[float, float]]) -> list[int]:
    def dominates(p: tuple[float, float], q: tuple[float, float]) -> bool:
        return p[0] <= q[0] and p[1] <= q[1] and (p[0] < q[0] or p[1] < q[1])

    ok = [i for i, p in enumerate(points) if all(map(math.isfinite, p))]
    return [i for i in ok if not any(dominates(points[j], points[i]) for j in ok if j != i)]


def test_pareto_front_hand_checked() -> None:
    pts = [
        (2.0, 100.0),  # 0 front: fewest bits
        (3.0, 50.0),  # 1 front
        (3.0, 60.0),  # 2 same bits as 1, worse ppl -> dominated
        (4.0, 50.0),  # 3 same ppl as 1, more bits -> dominated
        (5.0, 20.0),  # 4 front
        (5.0, 20.0),  # 5 exact duplicate of 4 -> kept too
        (8.0, 20.0),  # 6 dominated by 4/5
        (16.0, 10.0),  # 7 front: lowest ppl
        (2.0, 150.0),  # 8 dominated by 0
        (NAN, 1.0),  # 9 not finite -> never on the front, dominates nothing
        (1.0, INF),  # 10 idem
        (10.0, 30.0),  # 11 dominated by 4
    ]
    assert pareto_front(pts) == [0, 1, 4, 5, 7]
    # minimising both: the coordinate order does not matter
    assert pareto_front([(y, x) for x, y in pts]) == [0, 1, 4, 5, 7]
    assert pareto_front([]) == []
    assert pareto_front([(4.0, 9.0)]) == [0]
    assert pareto_front([(NAN, NAN)]) == []


def test_pareto_front_matches_the_definition_on_random_points_with_ties() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(0, 25)
        pts = [(float(rng.randint(0, 5)), float(rng.randint(0, 5))) for _ in range(n)]  # many ties
        if n and rng.random() < 0.3:
            pts[rng.randrange(n)] = (NAN, 0.0)
        assert pareto_front(pts) == _brute_force(pts), pts


# --------------------------------------------------------------------------- the table
def test_build_table_deltas_pareto_knobs_and_order() -> None:
    recs = [
        record(ppl=10.0, bpe=16.0, method="none"),
        record(ppl=12.0, bpe=4.25, method="uniform", bits="b4", grouping="g128"),  # no delta metrics
        record(ppl=30.0, bpe=2.25, method="uniform", bits="b2"),
        record(ppl=40.0, bpe=2.25, method="normal", bits="b2"),  # same bits, worse: dominated
        record(ppl=11.0, bpe=4.5, method="adaptive", bits="b4", baseline=10.0),
        record(
            ppl=11.0, bpe=4.5, method="adaptive", bits="b4", baseline=10.0, kv_residual=32
        ),  # duplicate point
        record(ppl=50.0, bpe=6.0, method="uniform", bits="b8", grouping="g128"),  # dominated
        record(ppl=99.0, bpe=3.0, method="uniform", bits="b3", model="other"),  # other setting, no baseline
        record("skipped", reason="attn-adaptive: nope", method="adaptive", bits="attn"),
    ]
    recs[4]["metrics"]["test/delta_ppl"] = 0.5  # a stored delta wins over a recomputed one
    df = build_table([{**r, "_path": f"run{i}"} for i, r in enumerate(recs)])
    assert len(df) == 8 and df["pareto"].dtype == bool
    by = {p: row for p, row in zip(df["path"], df.to_dict("records"))}
    assert by["run1"]["delta_ppl"] == pytest.approx(2.0) and by["run1"]["delta_ppl_pct"] == pytest.approx(
        20.0
    )
    assert by["run1"]["baseline_ppl"] == 10.0
    assert by["run0"]["delta_ppl"] == 0.0 and by["run0"]["baseline_ppl"] == 10.0
    assert by["run4"]["delta_ppl"] == 0.5
    assert math.isnan(by["run7"]["delta_ppl"]) and math.isnan(by["run7"]["baseline_ppl"])
    assert {p for p, row in by.items() if row["pareto"]} == {"run0", "run1", "run2", "run4", "run5", "run7"}
    assert by["run4"]["knobs"] == "kv.residual=0" and by["run5"]["knobs"] == "kv.residual=32"
    assert by["run1"]["knobs"] == ""
    # sorted: setting, then method none < uniform < normal < adaptive, grouping none < g128,
    # bits b8 < b4 < b2, then knobs
    assert list(df["path"]) == ["run7", "run0", "run2", "run6", "run1", "run3", "run4", "run5"]
    issues = skipped_and_failed(recs)
    assert issues == [
        {"status": "skipped", "name": recs[-1]["name"], "reason": "attn-adaptive: nope", "path": ""}
    ]


def test_same_experiment_twice_counts_once(tmp_path: Path) -> None:
    a = record(ppl=12.0, bpe=4.0)
    a["key"], a["finished"] = "k1", 1.0
    b = {**a, "finished": 2.0}
    write_records(tmp_path, [a, b])
    df = build_table(collect([tmp_path]))
    assert len(df) == 1 and df["path"].iat[0] == str(tmp_path / "1")


# --------------------------------------------------------------------------- collect
def test_corrupt_records_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_records(tmp_path / "sweep", [record(ppl=10.0, bpe=16.0, method="none"), record(ppl=12.0, bpe=4.0)])
    good = (tmp_path / "sweep" / "1" / "result.json").read_text()
    bad = {
        "truncated": good[: len(good) // 2].encode(),
        "empty": b"",
        "list": b"[1, 2]",
        "no_ppl": json.dumps({**record(ppl=1.0, bpe=1.0), "metrics": {}}).encode(),
        "binary": b"\xff\xfe\x00garbage",
    }
    for name, data in bad.items():
        (tmp_path / "sweep" / name).mkdir()
        (tmp_path / "sweep" / name / "result.json").write_bytes(data)
    (tmp_path / "sweep" / "dropped.json").write_text('{"not": "a list"}')
    with caplog.at_level(logging.WARNING, logger="kvq.report"):
        recs = collect([tmp_path / "sweep"])
    assert [r["status"] for r in recs] == ["ok", "ok"]
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in bad:
        assert str(tmp_path / "sweep" / name / "result.json") in warned, name
    assert "dropped.json" in warned
    files = write_report(recs, tmp_path / "out")
    assert all(p.exists() for p in files.values())


def test_dropped_json_from_the_sweeper_lists_invalid_and_duplicate_jobs(tmp_path: Path) -> None:
    common = ["model=tiny_random", "logger=none", "data.seq_len=32"]
    dropped = [
        {
            "index": 3,
            "overrides": [*common, "method=adaptive", "bits=attn"],
            "status": "invalid",
            "reason": "attn-adaptive: x",
        },
        {
            "index": 0,
            "overrides": [*common, "method=none", "bits=b2"],
            "status": "duplicate",
            "reason": "same as #1",
        },
    ]
    (tmp_path / "dropped.json").write_text(json.dumps(dropped))
    write_records(tmp_path, [record(ppl=10.0, bpe=16.0, method="none", model="tiny_random")])
    recs = collect([tmp_path])
    issues = skipped_and_failed(recs)
    assert [(i["status"], i["name"], i["reason"]) for i in issues] == [
        ("skipped", "model=tiny_random method=adaptive bits=attn", "attn-adaptive: x"),
        ("duplicate", "model=tiny_random method=none bits=b2", "same as #1"),
    ]
    md = write_report(recs, tmp_path / "out")["md"].read_text()
    assert "attn-adaptive: x" in md and "Dropped as duplicates" in md


# --------------------------------------------------------------------------- report files
def _assert_png(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert im.format == "PNG"
        extrema = im.convert("L").getextrema()
    assert 900 <= w <= 2600 and 500 <= h <= 2600, (w, h)
    assert extrema[0] < 80 and extrema[1] > 240  # drawn on: dark lines on a white background
    return w, h


def test_write_report_on_a_two_model_grid(tmp_path: Path) -> None:
    recs = grid_records()
    write_records(tmp_path / "runs", recs)
    files = write_report(collect([tmp_path / "runs"]), tmp_path / "out")
    assert set(files) == {"csv", "md", "png"}
    df = pd.read_csv(files["csv"])
    assert len(df) == sum(r["status"] == "ok" for r in recs)
    assert set(df["model"]) == {"smollm2_135m", "llama2_7b"}
    md = files["md"].read_text()
    for needle in (
        "## smollm2_135m · pydoc · fakequant",
        "## llama2_7b · pydoc · fakequant",
        "★",
        "36.0800",
        "5.4700",
    ):
        assert needle in md
    assert "NaN in layer 3 keys" in md and "attn-adaptive" in md
    assert "kv.residual=32" in md
    _assert_png(files["png"])


# --------------------------------------------------------------------------- CLI
def test_cli_missing_path_and_no_records(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such run directory" in err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run records" in err
    assert not (tmp_path / "o").exists()


def test_cli_wandb_without_credentials_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert main(["--wandb-project", "kvq", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wandb login" in err


# --------------------------------------------------------------------------- W&B
class _FakeRun:
    def __init__(self) -> None:
        self.logged: list[dict] = []
        self.summary: dict = {}

    def log(self, payload: dict) -> None:
        self.logged.append(payload)


def test_log_to_wandb_logs_a_table_and_an_image(tmp_path: Path) -> None:
    import wandb

    recs = [{**r, "_path": "x"} for r in grid_records()]
    files = write_report(recs, tmp_path)
    run = _FakeRun()
    log_to_wandb(recs, files, run)
    (payload,) = run.logged
    table = payload["report/table"]
    assert isinstance(table, wandb.Table) and isinstance(payload["report/pareto"], wandb.Image)
    assert len(table.data) == sum(r["status"] == "ok" for r in recs)
    assert {"method", "ppl", "delta_ppl", "bits_per_element", "pareto"} <= set(table.columns)
    assert isinstance(payload["report/not_ok"], wandb.Table) and len(payload["report/not_ok"].data) == 2
    assert run.summary["report/failed"] == 1 and run.summary["report/ok"] == len(table.data)

    from kvq.tracking import TrackedRun

    log_to_wandb(recs, files, TrackedRun())  # logging off (NoTracker's run): nothing to do


# --------------------------------------------------------------------------- a real grid
GRID = [
    "model=tiny_random",
    "logger=none",
    "data.seq_len=32",
    "data.max_windows=2",
    "method=none,uniform,adaptive",
    "bits=b2,b4,attn",
    # launch invalid jobs so they record `skipped` (the default drops them into dropped.json)
    "hydra.sweeper.drop_invalid=false",
]


@pytest.mark.slow
def test_report_on_a_real_tiny_grid(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "grid"
    out = train_eval_cli(["-m", *GRID, f"hydra.sweep.dir={sweep}"], tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = {p.parent: json.loads(p.read_text()) for p in sweep.rglob("result.json")}
    ok = {d: r for d, r in results.items() if r["status"] == "ok"}
    skipped = [r for r in results.values() if r["status"] == "skipped"]
    # none (its b2/attn twins dropped as duplicates), uniform b2/b4/attn, adaptive b2/b4; adaptive+attn skipped
    assert len(ok) == 6 and len(skipped) == 1

    report_dir = tmp_path / "report"
    assert main([str(sweep), "--out", str(report_dir)]) == 0
    printed = capsys.readouterr().out
    assert "6 ok, 1 skipped, 0 failed" in " ".join(printed.split())
    assert "Pareto set" in printed and str(report_dir / "report.md") in printed.replace("\n", "")

    # round_trip: pandas' default float parser can be one ulp off the exact decimal report.csv holds
    df = pd.read_csv(report_dir / "report.csv", float_precision="round_trip")
    assert len(df) == len(ok)
    base = next(r for r in ok.values() if r["choices"]["method"] == "none")["metrics"]["test/ppl"]
    for row in df.to_dict("records"):
        rec = ok[Path(row["path"])]
        m = rec["metrics"]
        for axis in ("method", "grouping", "bits", "granularity", "model", "data", "eval"):
            assert row[axis] == rec["choices"][axis]
        assert row["ppl"] == m["test/ppl"]
        assert row["bits_per_element"] == m["kv/bits_per_element"]
        assert row["compression"] == m["kv/compression"]
        assert row["delta_ppl"] == pytest.approx(
            m.get("test/delta_ppl", m["test/ppl"] - base), rel=1e-12, abs=1e-12
        )
        assert row["delta_ppl_pct"] == pytest.approx(100 * (m["test/ppl"] - base) / base, rel=1e-9, abs=1e-9)
    front = set(pareto_front(list(zip(df["bits_per_element"], df["ppl"]))))
    assert list(df["pareto"]) == [i in front for i in range(len(df))]

    md = (report_dir / "report.md").read_text()
    (skip,) = skipped
    assert skip["reason"] and skip["reason"] in md
    assert "adaptive" in skip["name"] and "attn" in skip["name"] and skip["name"] in md
    assert "Dropped as duplicates" in md and "method=none bits=b2" in md
    assert f"{base:.4f}" in md  # the baseline ppl of the setting
    n_star = sum(line.rstrip().endswith("| ★ |") for line in md.splitlines())
    assert n_star == int(df["pareto"].sum()) >= 2
    _assert_png(report_dir / "pareto.png")


def test_unknown_options_sort_after_known_ones_in_natural_order() -> None:
    recs = [
        record(ppl=12.0, bpe=4.0, method=m, grouping=g)
        for m, g in [
            ("hf_quanto", "g64"),
            ("adaptive", "g32"),
            ("uniform", "g256"),
            ("uniform", "g9"),
            ("none", "none"),
        ]
    ]
    df = build_table([{**r, "_path": str(i)} for i, r in enumerate(recs)])
    assert list(zip(df["method"], df["grouping"])) == [
        ("none", "none"),
        ("uniform", "g9"),
        ("uniform", "g256"),
        ("adaptive", "g32"),
        ("hf_quanto", "g64"),
    ]


@pytest.mark.slow
def test_grid_end_writes_report_and_logs_it_to_wandb(tmp_path: Path) -> None:
    """The ReportCallback (conf/config.yaml hydra.callbacks.report) after a real multirun."""
    import json as _json

    grid = ["model=tiny_random", "data.seq_len=32", "data.max_windows=1", "method=none,uniform", "bits=b2,b4"]
    out = train_eval_cli(
        ["-m", *grid, f"hydra.sweep.dir={tmp_path / 'grid'}"],
        tmp_path,
        env_extra={"KVQ_RESULTS_DIR": str(tmp_path / "store")},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rep = tmp_path / "grid" / "report"
    assert {"report.md", "report.csv", "pareto.png"} <= {p.name for p in rep.iterdir()}
    (run_dir,) = list((rep / "wandb").glob("offline-run-*"))
    from .conftest import wandb_summary

    summary = _json.dumps(wandb_summary(run_dir))
    assert "report/ok" in summary and "report/pareto_runs" in summary


def test_kvq_report_subcommand_is_wired(tmp_path: Path, capsys) -> None:
    from kvq.cli import main as kvq_main

    assert kvq_main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "missing" in capsys.readouterr().err

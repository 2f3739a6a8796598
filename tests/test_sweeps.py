"""W&B sweeps: the sweep files, their offline expansion and check, and generated command lines run
for real (W&B offline, read back with ``wandb leet inspect``)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvq.cli import main
from kvq.sweep import check, command_line, expand, load_sweep

from .conftest import REPO_ROOT, wandb_summary

GRID = REPO_ROOT / "sweeps" / "grid.yaml"
ATTN = REPO_ROOT / "sweeps" / "attn.yaml"
COMMAND = ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
#: pinned parameters that make every point a fast tiny_random run
TINY_PARAMS = {
    "model": {"value": "tiny_random"},
    "data.seq_len": {"value": 32},
    "data.max_windows": {"value": 1},
}


def _with(sweep: dict, **params) -> dict:
    return {**sweep, "parameters": {**sweep["parameters"], **params}}


# --------------------------------------------------------------------------- the sweep files
def test_grid_sweep_file() -> None:
    sw = load_sweep(GRID)
    assert sw["method"] == "grid" and sw["program"] == "train_eval.py"
    assert sw["metric"] == {"name": "test/ppl", "goal": "minimize"}
    assert sw["command"] == COMMAND
    assert {"method", "grouping", "bits", "granularity"} <= set(sw["parameters"])


def test_attention_aware_sweep_file() -> None:
    sw = load_sweep(ATTN)
    assert sw["method"] in ("bayes", "random") and sw["command"] == COMMAND
    assert sw["metric"] == {"name": "test/ppl", "goal": "minimize"}
    assert sw["parameters"]["bits"] == {"value": "attn"}
    assert {"bits.target_error", "bits.last_n", "bits.n_min", "bits.n_max"} <= set(sw["parameters"])
    assert "adaptive" not in sw["parameters"]["method"]["values"]


def test_bad_sweep_files_are_one_line_errors(tmp_path: Path) -> None:
    from kvq.sweep import SweepError

    bad = tmp_path / "bad.yaml"
    for text, needle in (
        (
            "method: grid\nparameters: {a: {values: [1]}}\nmetric: {name: x, goal: up}\n",
            "not a valid W&B sweep",
        ),
        ("method: [grid\n", "not valid YAML"),
        ("- 1\n", "a sweep is a mapping"),
    ):
        bad.write_text(text)
        with pytest.raises(SweepError, match=needle) as e:
            load_sweep(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(SweepError, match="not found"):
        load_sweep(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- expansion, commands
def test_grid_expands_to_the_cartesian_product_with_the_sweeps_package() -> None:
    sw = load_sweep(GRID)
    points, total = expand(sw)
    values = {k: v["values"] for k, v in sw["parameters"].items()}
    assert total == len(points) == 3 * 4 * 5 * 2
    expected = {tuple(sorted(zip(values, combo))) for combo in itertools.product(*values.values())}
    assert {tuple(sorted(p.items())) for p in points} == expected
    first, total = expand(sw, limit=7)
    assert len(first) == 7 and total == 120 and first == points[:7]


def test_random_and_bayes_sweeps_are_sampled() -> None:
    sw = load_sweep(ATTN)
    a, cap = expand(sw, limit=25, seed=3)
    assert len(a) == 25 and cap == sw["run_cap"]
    assert expand(sw, limit=25, seed=3)[0] == a  # reproducible
    assert len(expand(sw)[0]) == 20
    for p in a:
        assert (
            0.005 <= p["bits.target_error"] <= 0.5 and 1 <= p["bits.n_min"] <= 4 and 3 <= p["bits.n_max"] <= 8
        )


def test_command_line_is_what_the_wandb_agent_runs(monkeypatch) -> None:
    from wandb.sdk.launch.sweeps import utils

    sw = load_sweep(GRID)
    params = {"method": "uniform", "bits": "b4", "bits.target_error": 0.05}
    calls = []
    real = utils.create_sweep_command_args

    def spy(command):
        calls.append(command)
        return real(command)

    monkeypatch.setattr(utils, "create_sweep_command_args", spy)
    argv = command_line(sw, params)
    assert argv == [
        "/usr/bin/env",
        "python",
        "train_eval.py",
        "method=uniform",
        "bits=b4",
        "bits.target_error=0.05",
    ]
    assert calls == [{"args": {k: {"value": v} for k, v in params.items()}}]
    monkeypatch.setenv("KVQ_EXTRA", "seed=3")
    argv = command_line({**sw, "command": [*COMMAND, "${envvar:KVQ_EXTRA}"]}, {"method": "none"})
    assert argv[-2:] == ["method=none", "seed=3"]
    # the wandb default command passes --key=value flags, which Hydra does not take
    assert command_line({"program": "train_eval.py"}, {"bits": "b2"}) == [
        "/usr/bin/env",
        "python",
        "train_eval.py",
        "--bits=b2",
    ]


# --------------------------------------------------------------------------- the offline check
def test_check_grid_as_shipped() -> None:
    """The file as shipped: the default model, SmolLM2-135M (64-feature heads, 192-feature layers)."""
    from kvq.models import ModelUnavailableError, SmolLM2Embedded

    try:
        SmolLM2Embedded().meta()
    except ModelUnavailableError as e:
        pytest.skip(str(e))
    r = check(GRID)
    assert (r.count("run"), r.count("invalid"), r.count("duplicate"), r.count("malformed")) == (84, 8, 28, 0)
    assert r.ok() and r.total == 120 and r.warnings == []
    for run in r.runs:
        assert run.argv[:3] == ["/usr/bin/env", "python", "train_eval.py"] and "\n" not in run.reason
        if run.status == "invalid":
            assert (run.params["method"], run.params["bits"]) == ("adaptive", "attn")
            assert run.reason.startswith("attn-adaptive: ")
        if run.status == "duplicate":
            twin = r.runs[run.duplicate_of]
            assert run.params["granularity"] == "head" and run.params["grouping"] in ("g64", "g128")
            assert twin.status == "run" and twin.params == {**run.params, "grouping": "none"}
            assert run.reason.startswith(f"same experiment as #{twin.index} -- group-covers-unit: ")


def test_check_grid_static_and_model_aware_tiers() -> None:
    sw = _with(
        load_sweep(GRID),
        **TINY_PARAMS,
        grouping={"values": ["none", "g32"]},
        bits={"values": ["b4", "attn"]},
    )
    r = check(sw)  # tiny_random: 16-feature heads, 32-feature layers: g32 is grouping=none
    assert r.total == 24
    assert (r.count("run"), r.count("invalid"), r.count("duplicate"), r.count("malformed")) == (10, 4, 10, 0)
    static = check(sw, model_aware=False)  # the unit size is unknown: no duplicate found
    assert (static.count("run"), static.count("invalid"), static.count("duplicate")) == (20, 4, 0)


def test_check_bayes_sweep_samples() -> None:
    sw = _with(load_sweep(ATTN), **TINY_PARAMS)
    # a seed whose draws include impossible values (n_min > n_max, p = 1/24 per draw)
    seed = next(s for s in range(100) if any(p["bits.n_min"] > p["bits.n_max"] for p in expand(sw, 12, s)[0]))
    r = check(sw, limit=12, seed=seed)
    assert r.method == "bayes" and len(r.runs) == 12 and r.ok() and r.total == 50
    for run in r.runs:
        p = run.params
        assert (run.status == "invalid") == (p["bits.n_min"] > p["bits.n_max"]), run
        if run.status == "invalid":
            assert "bits.n_min" in run.reason and "must be <= bits.n_max" in run.reason
        if run.status == "run" and p["bits.n_min"] == p["bits.n_max"]:
            assert run.reason.startswith("note: attn-fixed: ")
    assert any(run.status == "invalid" for run in r.runs)


def test_check_reports_malformed_points_and_bad_commands() -> None:
    sw = {
        "program": "train_eval.py",
        "method": "grid",
        "parameters": {"bits.key_bits": {"values": [4, "four"]}, **TINY_PARAMS},
        "command": COMMAND,
    }
    r = check(sw)
    assert [x.status for x in r.runs] == ["run", "malformed"] and not r.ok()
    assert "could not be converted to Integer" in r.runs[1].reason and "\n" not in r.runs[1].reason
    r = check({**sw, "command": ["${env}", "${interpreter}", "${program}", "${args}"]})
    assert [x.status for x in r.runs] == ["malformed", "malformed"]
    assert any("args_no_hyphens" in w for w in r.warnings)


def test_cli_sweep_check(capsys, tmp_path: Path) -> None:
    assert main(["sweep", "check", str(GRID), "--no-model-aware", "--limit", "6"]) == 0
    out = capsys.readouterr().out
    assert "grid of 120 runs, first 6 checked" in out and "will execute: 6" in out
    assert "/usr/bin/env python train_eval.py bits=b2 granularity=head grouping=none method=uniform" in out
    assert "activate the venv" in out
    assert main(["sweep", "check", str(GRID), "--no-model-aware", "--limit", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"] == {"run": 3, "invalid": 0, "duplicate": 0, "malformed": 0} and data["total"] == 120
    assert main(["sweep", "check", str(tmp_path / "nope.yaml")]) == 2
    assert "sweep file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "program: train_eval.py\nmethod: grid\nparameters:\n  grouping.size: {values: [32, x]}\n"
        "  model: {value: tiny_random}\ncommand: ['${env}', '${interpreter}', '${program}', '${args_no_hyphens}']\n"
    )
    assert main(["sweep", "check", str(bad), "--no-commands"]) == 1  # a run would fail the agent
    assert "malformed (exit code 2: the agent counts a failure): 1" in capsys.readouterr().out


# --------------------------------------------------------------------------- runs for real
@pytest.mark.slow
def test_generated_command_lines_run_for_real_with_wandb_offline(tmp_path: Path) -> None:
    """What ``wandb agent`` would run, run here: valid points log test/ppl, invalid ones are tagged."""
    sw = _with(
        load_sweep(GRID),
        **TINY_PARAMS,
        method={"values": ["uniform", "adaptive"]},
        bits={"values": ["b4", "attn"]},
        grouping={"value": "none"},
        granularity={"value": "head"},
    )
    sw["program"] = str(REPO_ROOT / "train_eval.py")  # the agent's cwd would be the repository
    r = check(sw)
    assert [x.status for x in r.runs] == ["run", "run", "run", "invalid"]
    picks = r.runs[1:]  # adaptive b4, uniform attn, adaptive attn (skipped)
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` = the venv's (activated)
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path / "wandb"),
    }
    env.pop("WANDB_API_KEY", None)
    procs = []
    for i, run in enumerate(picks):
        cwd = tmp_path / f"run{i}"
        cwd.mkdir()
        procs.append(
            subprocess.Popen(
                run.argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    for run, p in zip(picks, procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (run.argv, err[-3000:])
    for i, run in enumerate(picks):
        (run_dir,) = list((tmp_path / f"run{i}").glob("outputs/*/*/wandb/offline-run-*"))
        info = wandb_summary(run_dir)
        assert info["exit_code"] == 0 and info["config"]["kvq"]["model"]["_target_"].endswith(
            "TinyRandomLlama"
        )
        assert f"method={run.params['method']}" in info["tags"]
        if run.status == "run":
            assert info["summary"]["test/ppl"] > 1 and "skipped" not in info["tags"]
        else:
            assert "skipped" in info["tags"] and "test/ppl" not in info["summary"]
            assert info["summary"]["skip_reason"].startswith("attn-adaptive: ")

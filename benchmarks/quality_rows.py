"""The rows ``bench_quality.py`` adds for rotation, nuq, budget allocation and the presets.

* :func:`kvq_rows` -- the new axes one at a time, beside the rows they improve on;
* :func:`preset_rows` -- the configurations ``python train_eval.py`` (the default), ``+experiment=kvq3``,
  ``+experiment=kvq2`` and the mission's ``method=adaptive grouping=g128`` compose to, built from
  ``conf/`` itself (so the benchmark measures exactly what the presets say);
* :func:`seed_rows` -- the seed question: uniform / adaptive / nuq at ~3 and ~4 bits per element,
  fixed widths vs attention-aware (QAQ through the bridge, its target error matched to the bits by
  bisection on two windows) vs ``bits=budget``, per-token keys and values on layer units.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvq.alloc import AttentionAwareBits, BudgetBits, FixedBits
from kvq.calib import Calibration
from kvq.quant import AdaptiveQuantizer, HadamardRotation, NUQQuantizer, UniformQuantizer

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class Row:
    """One configuration of the benchmark (``choices`` as a run record names them).

    Attributes:
        prepare: ``(row, measure) -> row`` run before the evaluation, e.g. to match an
            attention-aware target error to a number of bits (``measure(row) -> bits/element`` on
            two windows).
    """

    label: str
    method: Any
    bits: Any
    choices: dict[str, str]
    kv: dict[str, Any] = field(default_factory=dict)
    rotation: Any = None
    calib: Any = None
    prepare: Callable[[Row, Callable[[Row], float]], Row] | None = None


def _ch(group: int = 128, pre_rope: bool = True) -> dict[str, Any]:
    return dict(key_axis="channel", key_group=group, pre_rope=pre_rope)


def kvq_rows(protocol: str) -> list[Row]:
    """Rotation, nuq and budget rows (both protocols)."""
    u, n = UniformQuantizer, NUQQuantizer
    rv = HadamardRotation(keys=False)
    cal = Calibration()
    return [
        Row(
            "kvq 4-bit per token layer g64 + Hadamard",
            u(group_size=64),
            FixedBits(4),
            dict(method="uniform", grouping="g64", bits="b4", granularity="layer", rotation="hadamard"),
            rotation=HadamardRotation(),
        ),
        Row(
            "kvq 3-bit per token layer g64",
            u(group_size=64),
            FixedBits(3),
            dict(method="uniform", grouping="g64", bits="b3", granularity="layer", rotation="none"),
        ),
        Row(
            "kvq 3-bit per token layer g64 + Hadamard",
            u(group_size=64),
            FixedBits(3),
            dict(method="uniform", grouping="g64", bits="b3", granularity="layer", rotation="hadamard"),
            rotation=HadamardRotation(),
        ),
        Row(
            "kvq K3/V2 keys per channel G128 pre-RoPE, values g64",
            u(group_size=64),
            FixedBits(3, 2),
            dict(method="uniform", grouping="g64", bits="k3v2", granularity="layer", rotation="none"),
            _ch(),
        ),
        Row(
            "kvq K3/V2 keys per channel G128 pre-RoPE, values g64 + Hadamard",
            u(group_size=64),
            FixedBits(3, 2),
            dict(method="uniform", grouping="g64", bits="k3v2", granularity="layer", rotation="hadamard"),
            _ch(),
            rotation=rv,
        ),
        Row(
            "nuq K3/V2 keys per channel G128 pre-RoPE, values Hadamard",
            n(),
            FixedBits(3, 2),
            dict(method="nuq", grouping="none", bits="k3v2", granularity="layer", rotation="hadamard"),
            _ch(),
            rotation=rv,
            calib=cal,
        ),
        Row(
            "nuq 3-bit per token, per-channel key codebooks, g64",
            n(group_size=64, key_scale="absmax"),
            FixedBits(3),
            dict(method="nuq", grouping="g64", bits="b3", granularity="layer", rotation="none"),
            dict(pre_rope=True),
            calib=cal,
        ),
        Row(
            "uniform, budget 3.0 (keys per channel G128 pre-RoPE, values Hadamard)",
            u(),
            BudgetBits(avg=3.0),
            dict(
                method="uniform", grouping="none", bits="budget3.0", granularity="layer", rotation="hadamard"
            ),
            _ch(),
            rotation=rv,
            calib=cal,
        ),
    ]


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import kvq.config  # noqa: F401  (registers the schemas the options' defaults name)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def preset_row(label: str, overrides: list[str], meta: Any = None) -> Row:
    """A row whose objects are exactly what ``python train_eval.py OVERRIDES`` builds."""
    from hydra.core.global_hydra import GlobalHydra

    from kvq.experiment import make_point

    cfg = _compose([*overrides, "logger=none"])
    p = make_point(cfg, meta)
    if p.errors:
        raise SystemExit(f"benchmark: {overrides} do not build: {p.errors}")
    GlobalHydra.instance().clear()
    names = {"method": type(p.method).__name__, "bits": type(p.bits).__name__}
    return Row(
        label,
        p.method,
        p.bits,
        dict(
            method=getattr(p.method, "name", names["method"]) or names["method"],
            grouping=f"g{p.grouping.size}" if p.grouping.size else "none",
            bits=" ".join(overrides) or "default",
            granularity=p.granularity.unit,
            rotation=getattr(p.rotation, "name", "none"),
        ),
        p.kv.knobs(),
        rotation=p.rotation,
        calib=p.calib,
    )


def preset_rows(protocol: str) -> list[Row]:
    """The default configuration, the presets, and the mission's canonical adaptive g128."""
    out = [
        preset_row("default: python train_eval.py", []),
        preset_row("preset +experiment=kvq3", ["+experiment=kvq3"]),
        preset_row("preset +experiment=kvq2", ["+experiment=kvq2"]),
        preset_row(
            "method=adaptive grouping=g128 (with the new defaults)", ["method=adaptive", "grouping=g128"]
        ),
    ]
    return out


def _match_eps(target: float) -> Callable[[Row, Callable[[Row], float]], Row]:
    """A ``prepare`` hook: bisect ``log10(target_error)`` until bits/element is at most ``target``."""

    def prepare(row: Row, measure: Callable[[Row], float]) -> Row:
        lo, hi = -5.0, 0.0  # log10 eps: lo = many bits, hi = few
        best = replace(row, bits=replace(row.bits, target_error=10**hi))
        for _ in range(8):
            mid = (lo + hi) / 2
            cand = replace(row, bits=replace(row.bits, target_error=10**mid))
            if measure(cand) <= target:
                best, hi = cand, mid
            else:
                lo = mid
        eps = best.bits.target_error
        return replace(best, label=f"{best.label} (eps {eps:.3g})")

    return prepare


def seed_rows(protocol: str) -> list[Row]:
    """uniform / adaptive / nuq at ~3 and ~4 bits per element: fixed vs attention-aware vs budget
    (per-token keys and values, layer units of 192 features, the QAQ setting)."""
    cal = Calibration()
    methods: dict[str, tuple[Callable[[], Any], str, dict[float, FixedBits], tuple[int, int]]] = {
        # name: (quantizer, grouping, fixed widths nearest to ~3 / ~4 bits, attention-aware [n_min, n_max])
        "uniform": (
            lambda: UniformQuantizer(group_size=64),
            "g64",
            {3.0: FixedBits(3, 2), 4.0: FixedBits(4, 3)},
            (2, 6),
        ),
        "adaptive": (
            lambda: AdaptiveQuantizer(group_size=128),
            "g128",
            {3.0: FixedBits(2), 4.0: FixedBits(3, 2)},
            (2, 4),
        ),
        "nuq": (
            lambda: NUQQuantizer(group_size=64, key_scale="absmax"),
            "g64",
            {3.0: FixedBits(3, 2), 4.0: FixedBits(4, 3)},
            (2, 6),
        ),
    }
    out = []
    for name, (make, grouping, fixed, (n_min, n_max)) in methods.items():
        calib = cal if name == "nuq" else None
        for target in (3.0, 4.0):
            fb = fixed[target]
            ch = dict(method=name, grouping=grouping, granularity="layer", rotation="none")
            out.append(
                Row(
                    f"seed ~{target:g}: {name} {grouping} fixed K{fb.key_bits}/V{fb.bits_for('value')}",
                    make(),
                    fb,
                    {**ch, "bits": f"k{fb.key_bits}v{fb.bits_for('value')}"},
                    dict(pre_rope=name == "nuq"),
                    calib=calib,
                )
            )
            out.append(
                Row(
                    f"seed ~{target:g}: {name} {grouping} attention-aware (bridge)",
                    make(),
                    AttentionAwareBits(bridge=True, n_min=n_min, n_max=n_max),
                    {**ch, "bits": "attn"},
                    dict(pre_rope=name == "nuq"),
                    calib=calib,
                    prepare=_match_eps(target),
                )
            )
            out.append(
                Row(
                    f"seed ~{target:g}: {name} {grouping} budget {target:g}",
                    make(),
                    BudgetBits(avg=target, n_min=max(n_min - 1, 1), n_max=n_max if name != "adaptive" else 4),
                    {**ch, "bits": f"budget{target:g}"},
                    dict(pre_rope=name == "nuq"),
                    calib=cal,
                )
            )
    return out


def bits_ok(v: float) -> bool:
    return math.isfinite(v)

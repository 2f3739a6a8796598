"""The shared test matrix of quantizers: every ``method`` option whose class is a kvq
:class:`~kvq.quant.Quantizer`, discovered from ``conf/method/`` (a new method is picked up by
every test that uses the matrix, with no list to edit), plus named variants of them.

``QUANTIZERS[name](group_size, outlier_ratio)`` builds one; ``QUANTIZING`` leaves out the
full-precision baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import get_class

from kvq.quant import Quantizer

CONF_METHODS = Path(__file__).resolve().parents[1] / "conf" / "method"

#: extra matrix entries: name -> (option it varies, extra constructor arguments)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"uniform_sym": ("uniform", {"symmetric": True})}


def _discover() -> dict[str, type[Quantizer]]:
    out = {}
    for path in sorted(CONF_METHODS.glob("*.yaml")):
        target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
        cls = get_class(target) if isinstance(target, str) else None
        if isinstance(cls, type) and issubclass(cls, Quantizer):
            out[path.stem] = cls
    return out


#: option name -> its quantizer class
METHOD_CLASSES: dict[str, type[Quantizer]] = _discover()


def _factory(cls: type[Quantizer], extra: dict[str, Any]) -> Callable[[int | None, float], Quantizer]:
    return lambda g, o: cls(group_size=g, outlier_ratio=o, **extra)


QUANTIZERS: dict[str, Callable[[int | None, float], Quantizer]] = {
    name: _factory(cls, {}) for name, cls in METHOD_CLASSES.items()
}
QUANTIZERS.update(
    {
        name: _factory(METHOD_CLASSES[base], extra)
        for name, (base, extra) in VARIANTS.items()
        if base in METHOD_CLASSES
    }
)
#: the entries that quantize (the full-precision baseline left out)
QUANTIZING: dict[str, Callable[[int | None, float], Quantizer]] = {
    name: f for name, f in QUANTIZERS.items() if f(None, 0.0).quantizes
}


def analytic_error(q: Quantizer) -> bool:
    """Whether ``q`` computes its RMS error per width in closed form (else it is measured)."""
    return type(q).unit_rms_error is not Quantizer.unit_rms_error

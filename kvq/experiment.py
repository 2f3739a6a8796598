"""One point of the experiment space, built once, and its full-precision baseline.

A composed Hydra config names a point of the experiment space: one option per axis
(:data:`AXES`) plus run-wide knobs. :func:`make_point` instantiates the cheap axis nodes (no
model, no data) into a :class:`Point`; the validator's rules (:mod:`kvq.validate`), the run
(:mod:`kvq.run`) and the sweeper all work on that one object. The baseline of a point — the
same model, data, protocol and seed with the KV cache in full precision — is defined here and
only here (:func:`baseline_config`, :data:`BASELINE_CHOICES`, :func:`is_baseline_record`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kvq.errors import one_line

__all__ = [
    "AXES",
    "BASELINE_CHOICES",
    "BASELINE_NODES",
    "NON_EXPERIMENT_KEYS",
    "NUMERIC_PACKAGES",
    "Point",
    "baseline_config",
    "experiment_config",
    "identity",
    "is_baseline_record",
    "make_point",
    "node_of",
    "resolve_key_axis",
    "run_name",
    "unknown_keys",
]

#: the experimental axes (config groups), in the order runs are named and reports sorted
AXES: tuple[str, ...] = ("method", "grouping", "bits", "granularity", "model", "data", "eval", "rotation")
#: config keys that say where and how a run executes, is logged or stored -- not what it measures
NON_EXPERIMENT_KEYS: tuple[str, ...] = ("logger", "accelerator", "cache_dir", "hydra", "results_dir", "reuse")

#: the options of the non-model axes a full-precision baseline runs with (the config defaults)
BASELINE_CHOICES: dict[str, str] = {
    "method": "none",
    "bits": "b4",
    "grouping": "g64",
    "granularity": "layer",
    "rotation": "none",
}
BASELINE_NODES: dict[str, dict[str, Any]] = {
    "method": {"_target_": "kvq.quant.FullPrecision", "group_size": None, "outlier_ratio": 0.0},
    "bits": {"_target_": "kvq.alloc.FixedBits", "key_bits": 4, "value_bits": None},
    "grouping": {"_target_": "kvq.quant.Grouping", "size": 64},
    "granularity": {"_target_": "kvq.granularity.Granularity", "unit": "layer"},
    "rotation": {"_target_": "kvq.quant.NoRotation"},
}
#: the kv knobs a baseline resets, to the defaults of :class:`kvq.cache.KVSettings` (fp_dtype
#: stays: the baseline stores K/V in the same dtype)
_BASELINE_KV: dict[str, Any] = {
    "residual": 0,
    "sinks": 0,
    "outlier_ratio": 0.0,
    "key_axis": "auto",
    "key_group": 64,
    "pre_rope": False,
}


#: the packages whose versions are part of a result's identity, because they change its numbers:
#: torch (kernels, SDPA, dtype casts), transformers (the model code, GGUF dequantization, the
#: tokenizer glue) and kvq itself (its quantizers and cache). Not lightning, hydra, wandb or
#: datasets: they move numbers around, they do not compute them (the text is fingerprinted).
NUMERIC_PACKAGES: tuple[str, ...] = ("kvq", "torch", "transformers")


def identity(cfg: DictConfig, model_src: Any, device: Any) -> dict[str, Any]:
    """What changes a run's numbers beyond its config: the part of the experiment key that the
    config cannot say (:func:`kvq.validate.experiment_key`).

    Args:
        cfg: the composed config (its ``data`` node is instantiated, no text is read).
        model_src: the ``model`` node's loader (its ``fingerprint()``: a content hash of local
            weights, the HF-cache snapshot commit of a hub id).
        device: the ``torch.device`` the run computes on.

    Returns:
        ``device`` (its kind: ``cpu``/``cuda``), ``dtype`` (the compute dtype ``model.dtype``
        resolves to there: ``auto`` is float32 on CPU, bfloat16 on GPU), ``model`` and ``data``
        (fingerprints of what the weights and the text *are*) and ``versions``
        (:data:`NUMERIC_PACKAGES`).
    """
    from kvq.models import resolve_dtype
    from kvq.results import versions

    dtype = getattr(model_src, "dtype", None)
    resolved = str(resolve_dtype(dtype, device)).removeprefix("torch.") if dtype is not None else None
    data = instantiate(cfg.data, _convert_="all")
    fp = getattr(model_src, "fingerprint", None) or model_src.cache_key
    vs = versions()
    return {
        "device": device.type,
        "dtype": resolved,
        "model": fp(),
        "data": (getattr(data, "fingerprint", None) or data.cache_key)(),
        "versions": {p: vs.get(p) for p in NUMERIC_PACKAGES},
    }


def experiment_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` without the keys that do not define the experiment (:data:`NON_EXPERIMENT_KEYS`)."""
    c = copy.deepcopy(cfg)
    with open_dict(c):
        for k in NON_EXPERIMENT_KEYS:
            c.pop(k, None)
    return c


def baseline_config(cfg: DictConfig) -> DictConfig:
    """The full-precision baseline of ``cfg``: same model, data, protocol and seed, the KV cache
    unquantized (``method=none`` with the default axes and kv knobs, the same ``kv.fp_dtype``);
    the run-wide keys (placement, caches, logging) as in ``cfg``."""
    c = copy.deepcopy(cfg)
    with open_dict(c):
        for axis, node in BASELINE_NODES.items():
            c[axis] = copy.deepcopy(node)
        for k, v in _BASELINE_KV.items():
            c.kv[k] = v
    return c


def is_baseline_record(rec: dict[str, Any]) -> bool:
    """Whether a run record (``result.json``) is a full-precision baseline."""
    choice = str((rec.get("choices") or {}).get("method", ""))
    target = str(((rec.get("config") or {}).get("method") or {}).get("_target_", ""))
    return choice == BASELINE_CHOICES["method"] or target == BASELINE_NODES["method"]["_target_"]


def node_of(obj: Any) -> dict[str, Any]:
    """An axis object as a config node: its class and its init fields (after its own
    normalisation in ``__post_init__``), the form the experiment identity hashes."""
    fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    return {"_target_": f"{type(obj).__module__}.{type(obj).__qualname__}", **fields}


def run_name(choices: dict[str, str]) -> str:
    """A run's name: its option per axis, joined (``uniform-g128-b4-layer-smollm2_135m-pydoc-fakequant``)."""
    return "-".join(choices.get(a, "?") for a in AXES)


@dataclass
class Point:
    """A run's axes as objects (``None`` where a node could not be built, see ``errors``).

    Attributes:
        method: the method (a :class:`kvq.quant.Quantizer` or a peer cache, :mod:`kvq.peers`).
        bits: the bit allocator; grouping, granularity, kv, eval: their nodes.
        meta: the model's shape (model-aware rules) or ``None``.
        errors: node -> one-line message of a node that could not be built.
        seq_len: tokens per evaluation window (``data.seq_len``), ``None`` if unknown.
        rotation: the ``rotation`` node (``None`` where the config has none).
        calib: the ``calib`` node (``None`` where the config has none).
        data: the resolved ``data`` node as a plain dict (not instantiated), or ``None``.
    """

    method: Any
    bits: Any
    grouping: Any
    granularity: Any
    kv: Any
    eval: Any
    meta: Any = None
    errors: dict[str, str] = field(default_factory=dict)
    seq_len: int | None = None
    rotation: Any = None
    calib: Any = None
    data: dict[str, Any] | None = None

    def unit_size(self) -> int | None:
        """Features in one quantization unit on this model (``None`` without the model's shape)."""
        if self.meta is None or self.granularity is None:
            return None
        return self.granularity.unit_size(self.meta)

    def prefix_len(self) -> int | None:
        """Prefix tokens of a whole-cache protocol (``None`` for other protocols or unknown)."""
        if self.eval is None or self.seq_len is None:
            return None
        return self.eval.prefix_tokens(self.seq_len)

    def cached_tokens(self) -> int | None:
        """Most tokens the cache holds when it quantizes, per window (``None`` if unknown)."""
        if self.eval is None or self.seq_len is None:
            return None
        return self.eval.cached_tokens(self.seq_len)


#: a method field that interpolates another node by default (``conf/method/*.yaml``), as it
#: appears in the method's error message: an error of the source node is reported once, not
#: again by the method
_ECHOES = (
    ("group_size", "grouping"),
    ("outlier_ratio", "kv"),
    ("supports bits", "bits"),
    ("residual_length", "kv"),
)


def make_point(cfg: DictConfig, meta: Any = None) -> Point:
    """Instantiate the cheap axis nodes of ``cfg`` (no model, no data)."""
    errors: dict[str, str] = {}
    built: dict[str, Any] = {}
    for name in ("grouping", "granularity", "kv", "bits", "eval", "method", "rotation", "calib"):
        if name in ("rotation", "calib") and name not in cfg:
            built[name] = None
            continue
        try:
            built[name] = instantiate(cfg[name], _convert_="all")
        except Exception as e:  # noqa: BLE001 -- reported as a one-line violation
            errors[name] = one_line(e, root_cause=True)
            built[name] = None
    m = errors.get("method", "")
    if any(f in m and src in errors for f, src in _ECHOES):
        del errors["method"]
    seq_len = _select_int(cfg, "data.seq_len")
    max_windows = _select_int(cfg, "data.max_windows")
    if seq_len is not None and seq_len < 2:
        errors["data"] = f"data.seq_len must be >= 2 (got {seq_len})"
        seq_len = None
    elif max_windows is not None and max_windows < 1:
        errors["data"] = f"data.max_windows must be >= 1 or null for all (got {max_windows})"
    try:
        data = (
            OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=False) if "data" in cfg else None
        )
    except Exception:  # noqa: BLE001 -- the data node's own errors surface when it is built
        data = None
    point = Point(
        meta=meta, errors=errors, seq_len=seq_len, data=data if isinstance(data, dict) else None, **built
    )
    if point.kv is not None and point.kv.key_axis == "auto":
        point.kv = dataclasses.replace(point.kv, key_axis=resolve_key_axis(point)[0])
    return point


def resolve_key_axis(p: Point) -> tuple[str, str]:
    """What ``kv.key_axis=auto`` (the default) means for ``p``, and why.

    ``channel`` (KIVI/KVQuant: each key channel over ``kv.key_group`` tokens; the layout that
    keeps keys' outlier channels apart) wherever the point can quantize keys that way, else
    ``token``: the method does not quantize in kvq's cache (``method=none``, the peers, which
    build their own), the allocator gives each token its own key width (``bits=attn`` without
    ``bits.fixed_key_bits``), the unit spans layers (``granularity=token``), or the cache never
    holds one whole key group beyond the sinks and the residual window (a short
    ``data.seq_len``). An explicit ``kv.key_axis`` is never changed (the validator refuses
    what it cannot do); the resolved axis is what the run records and its key hashes.

    Returns:
        ``(axis, reason)``: the axis and one line saying why.
    """
    m = p.method
    if m is None or not getattr(m, "quantizes", False) or not getattr(m, "one_pass_quantized", False):
        return "token", "the method does not quantize in kvq's cache"
    if "kv.key_axis" in getattr(m, "ignores", ()):
        return "token", "the method has no key axis"
    if p.bits is not None and getattr(p.bits, "per_token_keys", False):
        return (
            "token",
            "bits=attn gives each token its own key width (bits.fixed_key_bits=N keeps channel keys)",
        )
    if p.granularity is not None and p.granularity.spans_layers:
        return "token", "granularity=token makes one unit of a token across all layers"
    n = p.cached_tokens()
    if (
        n is not None
        and p.kv is not None
        and dataclasses.replace(p.kv, key_axis="channel").quantized_tokens(n) == 0
    ):
        return (
            "token",
            f"the cache holds {n} tokens per window, less than one key group (kv.key_group={p.kv.key_group})",
        )
    return "channel", f"keys per channel in groups of kv.key_group={p.kv.key_group if p.kv else '?'} tokens"


def _select_int(cfg: DictConfig, key: str) -> int | None:
    v = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    return None if isinstance(v, bool) or not isinstance(v, int) else v


#: the nodes whose keys are a class's fields (``_target_`` nodes), checked by :func:`unknown_keys`
_TARGET_NODES = ("method", "grouping", "bits", "granularity", "kv", "eval", "model", "data", "logger")
_HYDRA_KEYS = {"_target_", "_convert_", "_recursive_", "_partial_", "_args_"}


def unknown_keys(cfg: DictConfig) -> list[str]:
    """One line per key of a ``_target_`` node that its class has no field for.

    Nodes with a schema (``conf/<group>/`` options) reject those at composition; this catches
    the rest: a key forced in with ``+kv.foo=1``, or an option whose YAML comes from another
    config directory (``hydra.searchpath``) without a schema.
    """
    out = []
    for name in _TARGET_NODES:
        node = cfg.get(name) if isinstance(cfg, DictConfig) else None
        if not isinstance(node, DictConfig):
            continue
        target = node.get("_target_")
        try:
            cls = get_class(str(target))
        except Exception:  # noqa: BLE001 -- an unimportable target fails when it is built
            continue
        if not dataclasses.is_dataclass(cls):
            continue
        fields = [f.name for f in dataclasses.fields(cls) if f.init]
        extra = [str(k) for k in node if k not in fields and k not in _HYDRA_KEYS]
        if extra:
            out.append(
                f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(f'{name}.{k}' for k in extra)}: "
                f"{cls.__module__}.{cls.__qualname__} has the fields {', '.join(fields) or '(none)'}"
            )
    return out

"""Calibration: the offline fitting step of calibrated methods and allocators (the ``calib`` axis).

A component that needs fitting before evaluation declares ``needs_calibration = True`` and
implements ``calibrate(stats, setup)`` (:class:`Calibrated`): ``method=nuq`` fits its codebooks,
``bits=budget`` its per-layer widths. :func:`calibrate` runs once per run, before the test loop:

1. :class:`Calibration` (the ``calib`` config node) picks ``windows`` windows of ``seq_len``
   tokens from its text, with its ``seed``, **disjoint from the evaluation windows**: from the
   embedded pydoc text (default), a local file, or the evaluation text itself (``text=data``);
   whenever the calibration text is the evaluation text, only tokens after the evaluated windows
   are used (the validator refuses a configuration where none exist: rule ``calib-overlap``);
2. :func:`collect` runs the model on them once (forward + backward of the summed next-token loss)
   and keeps per layer the keys (after RoPE), the values and the loss gradient with respect to
   each (:class:`CalibStats`); the squared gradient is the diagonal Fisher information, the
   sensitivity KVQuant weights its k-means with and :class:`kvq.alloc.BudgetBits` ranks widths by;
3. each calibrated component fits itself (the method first: an allocator asks the fitted method
   for its error at each width).

Collected statistics are cached in-process per (model, calibration windows), fitted states per
(statistics, component, cache settings) -- a grid pays once -- and fitted states also on disk
under ``<results_dir>/calib/`` when a directory is given, keyed like results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from kvq.data import LocalText, PyDoc, TokenWindowDataModule
from kvq.results import atomic_write

__all__ = [
    "CALIB_TEXTS",
    "CalibStats",
    "Calibrated",
    "Calibration",
    "calibrate",
    "calibrated_metrics",
    "clear_calibration_cache",
    "collect",
    "visibility",
    "needs_calibration",
    "stored_once_bytes",
]

log = logging.getLogger("kvq")

#: where calibration windows come from
CALIB_TEXTS: tuple[str, ...] = ("pydoc", "data", "local")


@runtime_checkable
class Calibrated(Protocol):
    """A method or allocator fitted offline before evaluation."""

    needs_calibration: bool

    def calibrate(self, stats: CalibStats, setup: Any) -> None:
        """Fit from ``stats`` for the cache ``setup`` (:class:`kvq.protocols.KVSetup`) builds."""
        ...


def needs_calibration(obj: Any) -> bool:
    """Whether ``obj`` (a method, an allocator, ...) must be calibrated before it is used."""
    return bool(getattr(obj, "needs_calibration", False))


@dataclass
class Calibration:
    """The ``calib`` node: which windows calibrated components are fitted on.

    Args:
        text: ``pydoc`` (the embedded text, default), ``local`` (``path``), or ``data`` (the
            evaluation text itself, after the evaluated windows).
        path: the file for ``text=local``.
        windows: calibration windows.
        seq_len: tokens per calibration window (``None`` = ``data.seq_len``).
        seed: picks the windows among the allowed ones (and seeds the fitting).
    """

    text: str = "pydoc"
    path: str | None = None
    windows: int = 4
    seq_len: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.text not in CALIB_TEXTS:
            raise ValueError(f"calib.text must be one of {', '.join(CALIB_TEXTS)}, got {self.text!r}")
        if isinstance(self.windows, bool) or not isinstance(self.windows, int) or self.windows < 1:
            raise ValueError(f"calib.windows must be a positive integer, got {self.windows!r}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 2):
            raise ValueError(f"calib.seq_len must be an integer >= 2 or null, got {self.seq_len!r}")

    # -- which text, and is it the evaluation text? ------------------------------------------
    def same_text(self, data: dict[str, Any]) -> bool:
        """Whether the calibration text is the evaluation text of the ``data`` node (a resolved dict)."""
        if self.text == "data":
            return True
        target = str(data.get("_target_", ""))
        if self.text == "pydoc":
            return target.endswith(".PyDoc")
        if target.endswith(".LocalText") and data.get("path"):
            try:
                return (
                    Path(str(data["path"])).expanduser().resolve()
                    == Path(str(self.path)).expanduser().resolve()
                )
            except OSError:
                return str(data["path"]) == str(self.path)
        return False

    def overlap(self, data: dict[str, Any]) -> str | None:
        """Why the calibration windows cannot be disjoint from the evaluation windows, or ``None``.

        Decidable from the config alone only when the evaluation reads the whole text
        (``data.max_windows=null``); too short a tail is found when the text is tokenised.
        """
        if self.same_text(data) and data.get("max_windows", 16) is None:
            which = "the evaluation text" if self.text == "data" else f"calib.text={self.text}"
            return (
                f"{which} is the evaluation text and data.max_windows=null evaluates all of it: "
                "no calibration window would be disjoint from the evaluated ones"
            )
        return None

    def source(self, data_source: Any) -> Any:
        """The calibration text source (``data_source`` is the run's ``data`` object)."""
        if self.text == "data":
            return data_source
        if self.text == "local":
            if not (self.path and str(self.path).strip()):
                raise ValueError("calib=local needs calib.path=/path/to/file.txt")
            return LocalText(path=self.path)
        return PyDoc()

    # -- the windows ----------------------------------------------------------------------
    def batches(self, tokenizer: Any, data_source: Any, cache_dir: str | None = None) -> torch.Tensor:
        """``[windows, seq_len]`` calibration token windows, disjoint from the evaluation windows.

        The evaluation reads the first ``data.max_windows`` windows of its text; when the
        calibration text is that text, calibration windows are cut from the tokens after them.

        Raises:
            ValueError: not enough tokens for ``windows`` disjoint windows (one line).
        """
        src = self.source(data_source)
        eval_len = int(getattr(data_source, "seq_len", 512))
        T = int(self.seq_len or eval_len)
        add_bos = getattr(data_source, "add_bos", None)
        dm = TokenWindowDataModule(
            src, tokenizer, seq_len=T, max_windows=None, add_bos=add_bos, cache_dir=cache_dir
        )
        ids = dm.token_ids
        body = T - 1 if dm.add_bos else T
        start = 0
        same = self.text == "data" or (
            type(src) is type(data_source)
            and getattr(src, "cache_key", lambda: "a")() == getattr(data_source, "cache_key", lambda: "b")()
        )
        if same:
            ev = TokenWindowDataModule(
                data_source, tokenizer, seq_len=eval_len, max_windows=data_source.max_windows, add_bos=add_bos
            )
            if data_source.max_windows is None:
                raise ValueError(
                    "calibration text = evaluation text with data.max_windows=null: no disjoint calibration window"
                )
            ev_body = eval_len - 1 if ev.add_bos else eval_len
            start = min(ev.token_ids.numel() // ev_body, data_source.max_windows) * ev_body
        avail = (ids.numel() - start) // body
        if avail < self.windows:
            raise ValueError(
                f"calibration needs {self.windows} windows of {body} tokens from {src.cache_key()} "
                f"after token {start} (the evaluated windows), but only {max(avail, 0)} fit: "
                "lower calib.windows or calib.seq_len, or use another calib.text"
            )
        pick = sorted(random.Random(self.seed).sample(range(avail), self.windows))
        rows = [ids[start + i * body : start + (i + 1) * body] for i in pick]
        out = torch.stack(rows)
        if dm.add_bos:
            bos = torch.full((out.shape[0], 1), int(tokenizer.bos_token_id), dtype=torch.long)
            out = torch.cat([bos, out], dim=1)
        return out

    def key(self) -> str:
        """A stable string naming the calibration settings."""
        return json.dumps(asdict(self), sort_keys=True)


# ---------------------------------------------------------------------------------------------
# statistics of the calibration windows
# ---------------------------------------------------------------------------------------------


def _unrope(x: torch.Tensor, rope: Any) -> torch.Tensor:
    """Undo RoPE on ``[B, H, T, d]`` at positions ``0..T-1`` (also maps a gradient: RoPE is orthogonal)."""
    cos, sin = rope(x, 0)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos - rot * sin


@dataclass
class CalibStats:
    """Keys, values and their loss gradients of the calibration windows, per layer.

    Attributes:
        keys: per layer, float32 ``[n, H_kv, T, d]`` keys after RoPE.
        values: per layer, float32 ``[n, H_kv, T, d]``.
        key_grads: per layer, ``d loss / d keys`` (same shape; the summed next-token NLL).
        value_grads: per layer, ``d loss / d values``.
        rope: the model's rotary embedding (``rope(x, start) -> (cos, sin)``) or ``None``.
        tag: names the model and windows (cache keys of fitted states).
        seed: the calibration seed (fitting draws from it).
        eval_tokens: tokens the run evaluates (``data.seq_len x data.max_windows``; ``None`` =
            unknown): what a budget amortises once-per-model storage (codebooks) over.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_grads: list[torch.Tensor]
    value_grads: list[torch.Tensor]
    rope: Any = None
    tag: str = ""
    seed: int = 0
    eval_tokens: int | None = None

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    def kv(self, layer: int, kind: str, setup: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, grad)`` ``[n, H, T, d]`` of ``layer`` and ``kind`` in the basis the cache of
        ``setup`` quantizes in: keys before RoPE with ``kv.pre_rope``, then the setup's rotation."""
        x = (self.keys if kind == "key" else self.values)[layer]
        g = (self.key_grads if kind == "key" else self.value_grads)[layer]
        knobs = getattr(setup, "knobs", {}) or {}
        if kind == "key" and knobs.get("pre_rope"):
            if self.rope is None:
                raise ValueError("kv.pre_rope=true needs the model's rotary embedding for calibration")
            x, g = _unrope(x, self.rope), _unrope(g, self.rope)
        rot = getattr(setup, "rotation", None)
        if rot is not None:
            x, g = rot.rotate(x, layer, kind).float(), rot.rotate(g, layer, kind).float()
        return x, g

    def units(self, layer: int, kind: str, setup: Any, quantizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(units [N, D], fisher [N, D])``: what the cache of ``setup`` hands ``quantizer``
        for ``layer`` and ``kind``, and the squared loss gradient of each element."""
        from kvq.cache import KVQuantSpec  # the cache's own unit layout

        spec = KVQuantSpec(quantizer, granularity=setup.granularity, **(getattr(setup, "knobs", {}) or {}))
        x, g = self.kv(layer, kind, setup)
        T = x.shape[-2] - x.shape[-2] % spec.token_block if kind == "key" else x.shape[-2]
        x, g = x[..., :T, :], g[..., :T, :]
        return spec.units(kind, x), spec.units(kind, g).pow(2)


def _model_tag(model: torch.nn.Module) -> str:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", "") or type(model).__name__
    n = sum(p.numel() for p in model.parameters())
    first = next(model.parameters())
    return f"{name}|{n}|{float(first.detach().float().flatten()[:64].sum()):.6e}|{id(model)}"


def visibility(setup: Any, protocol: Any, T: int) -> torch.Tensor:
    """bool ``[T, T]``: where query ``t`` attends to key ``j`` *quantized* in ``protocol`` with the
    cache of ``setup`` (the rest it sees in full precision, or not at all).

    Streaming protocols (``fakequant``, ``decode``): the cache's own streaming order (sinks and the
    residual window in full precision, keys in whole groups with per-channel keys:
    :meth:`kvq.cache.QuantizedLayer.query_mix_mask`); also the whole-cache protocols without a
    prefix/continuation split (passkey, needle: their prompts are not text windows). Prefix
    protocols (``prefill``): the
    continuation's queries see the prefix quantized (but its sinks and newest ``residual``), the
    prefix's own queries see it in full precision.
    """
    knobs = getattr(setup, "knobs", {}) or {}
    S, R = int(knobs.get("sinks", 0)), int(knobs.get("residual", 0))
    P = protocol.prefix_tokens(T) if getattr(protocol, "quantizes_whole_cache", False) else None
    if P is not None:  # a prefix quantized as a whole, a continuation scored against it
        P = int(P)
        q = torch.arange(T).unsqueeze(1)
        k = torch.arange(T).unsqueeze(0)
        return (q >= P) & (k >= S) & (k < P - R)
    from kvq.cache import KVQuantSpec, QuantizedLayer
    from kvq.quant.methods import FullPrecision

    spec = KVQuantSpec(FullPrecision(), granularity=getattr(setup, "granularity", "layer"), **knobs)
    return QuantizedLayer(0, spec).query_mix_mask(0, T, T)


def _recorder(n_layers: int, mask: torch.Tensor | None) -> Any:
    """A transformers ``Cache`` that hands the attention a separate copy of each layer's K/V (the
    "quantized view", whose gradient is the calibration's sensitivity) and, with ``mask``, leaves the
    full-precision K/V for the ``kvq`` attention to mix per query (:class:`kvq.attention.MixedKV`)."""
    from transformers.cache_utils import Cache, DynamicLayer

    from kvq.attention import MixedKV, leave_mixed

    class _Layer(DynamicLayer):
        def __init__(self, idx: int) -> None:
            super().__init__()
            self.idx = idx
            self.fp: tuple[torch.Tensor, torch.Tensor] | None = None
            self.view: tuple[torch.Tensor, torch.Tensor] | None = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.fp = (key_states, value_states)
            self.view = (key_states * 1.0, value_states * 1.0)  # its own autograd node
            if mask is not None:
                leave_mixed(self.idx, MixedKV(key_states, value_states, mask.to(key_states.device)))
            self.keys, self.values = self.view
            return self.view

    class _Recorder(Cache):
        def __init__(self) -> None:
            super().__init__(layers=[_Layer(i) for i in range(n_layers)])

    return _Recorder()


def collect(
    model: torch.nn.Module,
    batches: torch.Tensor,
    rope: Any = None,
    tag: str = "",
    seed: int = 0,
    mask: torch.Tensor | None = None,
) -> CalibStats:
    """Run ``model`` on calibration ``batches`` ``[n, T]`` and keep per layer K, V and the loss
    gradient with respect to them *where they are seen quantized*.

    One forward and one backward per window (the summed next-token NLL). The attention reads a
    separate copy of each layer's K/V (:func:`_recorder`); with ``mask`` (:func:`visibility`) and
    the ``kvq`` attention, query ``t`` reads that copy only where it would see the key quantized
    and the original elsewhere, so the gradient is the sensitivity of the protocol's own loss to a
    quantization error (keys of a group that is not complete yet, or the residual window, are
    excluded, as in the evaluation). Without the ``kvq`` attention every query reads the copy.
    """
    from kvq.attention import clear_mixed

    dev = next(model.parameters()).device
    keys: list[list[torch.Tensor]] = []
    values: list[list[torch.Tensor]] = []
    kg: list[list[torch.Tensor]] = []
    vg: list[list[torch.Tensor]] = []
    emb_layer = model.get_input_embeddings()
    n_layers = int(model.config.num_hidden_layers)
    with torch.enable_grad():
        for row in batches:
            ids = row.view(1, -1).to(dev)
            emb = emb_layer(ids).detach().requires_grad_(True)
            cache = _recorder(n_layers, mask)
            clear_mixed()
            out = model(inputs_embeds=emb, cache=cache, use_cache=True)
            clear_mixed()
            logits = out.logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            layers = [layer for layer in cache.layers if layer.view is not None]
            views = [layer.view[0] for layer in layers] + [layer.view[1] for layer in layers]
            grads = torch.autograd.grad(loss, views, allow_unused=True)
            L = len(layers)
            for i, layer in enumerate(layers):
                if len(keys) <= i:
                    keys.append([]), values.append([]), kg.append([]), vg.append([])
                k, v = layer.fp
                gk = grads[i] if grads[i] is not None else torch.zeros_like(k)
                gv = grads[L + i] if grads[L + i] is not None else torch.zeros_like(v)
                keys[i].append(k.detach().float().cpu())
                values[i].append(v.detach().float().cpu())
                kg[i].append(gk.detach().float().cpu())
                vg[i].append(gv.detach().float().cpu())
            del out, cache, grads, loss, views, layers
    cat = lambda xs: [torch.cat(x, dim=0) for x in xs]  # noqa: E731
    return CalibStats(cat(keys), cat(values), cat(kg), cat(vg), rope=rope, tag=tag, seed=seed)


# ---------------------------------------------------------------------------------------------
# orchestration and caches
# ---------------------------------------------------------------------------------------------

#: (model, windows) -> statistics: one entry (the last), they are large
_STATS: dict[str, CalibStats] = {}
#: (statistics, component, setup) -> the component's fitted state
_FITTED: dict[str, Any] = {}


def clear_calibration_cache() -> None:
    """Forget collected statistics and fitted states (tests, memory)."""
    _STATS.clear()
    _FITTED.clear()


def _describe(obj: Any) -> Any:
    """A JSON-able description of a config object (its init fields, recursively by repr)."""
    if obj is None:
        return None
    try:
        return {
            "_type": f"{type(obj).__module__}.{type(obj).__qualname__}",
            **{f.name: repr(getattr(obj, f.name)) for f in fields(obj) if f.init},
        }
    except TypeError:
        return repr(obj)


def _setup_key(setup: Any) -> dict[str, Any]:
    return {
        "granularity": str(getattr(setup, "granularity", "")),
        "knobs": getattr(setup, "knobs", {}),
        "rotation": _describe(getattr(setup, "rotation", None)),
        "method": _describe(getattr(setup, "method", None)),
        "bits": _describe(getattr(setup, "allocator", None)),
    }


def _fit(component: Any, stats: CalibStats, setup: Any, extra: dict[str, Any], store: Path | None) -> None:
    """Fit ``component`` (from the in-process cache, the disk store, or from ``stats``)."""
    key_doc = {"stats": stats.tag, "component": _describe(component), "setup": _setup_key(setup), **extra}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True, default=str).encode()).hexdigest()[:20]
    can_save = hasattr(component, "calib_state") and hasattr(component, "load_calib_state")
    if can_save and key in _FITTED:
        component.load_calib_state(_FITTED[key])
        return
    path = store / f"{key}.pt" if store is not None else None
    if can_save and path is not None and path.exists():
        try:
            component.load_calib_state(torch.load(path, weights_only=False))
            _FITTED[key] = component.calib_state()
            return
        except Exception as e:  # noqa: BLE001 -- a corrupt file is refitted
            log.warning("ignoring unreadable calibration state %s (%s)", path, e)
    component.calibrate(stats, setup)
    if can_save:
        state = component.calib_state()
        _FITTED[key] = state
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda f: torch.save(state, f))
            except OSError as e:
                log.warning("could not store calibration state %s (%s)", path, e)


def calibrate(
    setup: Any,
    calib: Calibration | None,
    model: torch.nn.Module,
    tokenizer: Any,
    data_source: Any,
    store: str | Path | None = None,
    model_tag: str | None = None,
    cache_dir: str | None = None,
    protocol: Any = None,
) -> bool:
    """Fit every calibrated component of ``setup`` (its method, then its allocator).

    Args:
        setup: the run's :class:`kvq.protocols.KVSetup`.
        calib: the ``calib`` node (the default :class:`Calibration` when ``None``).
        model: the loaded model (eval mode).
        tokenizer: its tokenizer.
        data_source: the run's ``data`` object (calibration windows avoid its evaluated windows).
        store: a folder for fitted states on disk (``<results_dir>/calib``), or ``None``.
        model_tag: names the weights in cache keys (default: derived from the model object).
        cache_dir: token cache folder.
        protocol: the run's protocol (the sensitivity is measured where its queries see quantized
            K/V, :func:`visibility`); ``None`` = streaming.

    Returns:
        Whether anything was calibrated.
    """
    if not getattr(setup.method, "quantizes", True):  # the full-precision baseline: nothing to fit
        return False
    parts = [p for p in (setup.method, setup.allocator) if needs_calibration(p)]
    if not parts:
        return False
    calib = calib or Calibration()
    tag = json.dumps(
        {
            "model": model_tag or _model_tag(model),
            "calib": calib.key(),
            "data": data_source.cache_key() if calib.text == "data" else None,
            "eval_windows": getattr(data_source, "max_windows", None),
            "seq_len": getattr(data_source, "seq_len", None),
            "protocol": _describe(protocol),
            "knobs": getattr(setup, "knobs", {}),
            "granularity": str(getattr(setup, "granularity", "")),
        },
        sort_keys=True,
    )
    stats = _STATS.get(tag)
    if stats is None:
        batches = calib.batches(tokenizer, data_source, cache_dir=cache_dir)
        rope = getattr(setup, "rope", None)
        log.info("kvq: calibrating on %d windows of %d tokens", batches.shape[0], batches.shape[1])
        mask = visibility(setup, protocol, batches.shape[1])
        stats = collect(model, batches, rope=rope, tag=tag, seed=calib.seed, mask=mask)
        _STATS.clear()
        _STATS[tag] = stats
    seq, windows = getattr(data_source, "seq_len", None), getattr(data_source, "max_windows", None)
    # the tag names the data's seq_len and max_windows: the same statistics, the same evaluated tokens
    stats.eval_tokens = int(seq) * int(windows) if isinstance(seq, int) and isinstance(windows, int) else None
    folder = Path(store) if store is not None else None
    for p in parts:
        _fit(p, stats, setup, {"role": "method" if p is setup.method else "bits"}, folder)
    # what the fitting encoded (an allocator measuring the method at every width) is not what the
    # run stores: once-per-model storage counts only what the evaluation then uses
    for p in (setup.method, setup.allocator):
        reset = getattr(p, "reset_usage", None)
        if callable(reset):
            reset()
    return True


def stored_once_bytes(setup: Any) -> int:
    """Bytes a run stores once per model besides the per-window caches (codebooks of ``nuq``)."""
    total = 0
    for p in (
        getattr(setup, "method", None),
        getattr(setup, "allocator", None),
        getattr(setup, "rotation", None),
    ):
        f = getattr(p, "codebook_bytes", None)
        if callable(f):
            total += int(f())
    return total


def calibrated_metrics(setup: Any, metrics: dict[str, float]) -> dict[str, float]:
    """A run's metrics with what calibration adds: the codebooks stored once per model amortised
    into ``kv/bits_per_element`` (:func:`kvq.memory.amortised`; always reported, 0 bytes for an
    uncalibrated method) and an allocator's report (``bits/budget/*``)."""
    from kvq.memory import amortised

    out = dict(metrics)
    once = stored_once_bytes(setup)
    if once and "kv/bytes" in out and "kv/bytes_fp16" in out:
        out.update(amortised(out, once))
    elif "kv/bits_per_element" in out:
        out.update({"kv/codebook_bytes": 0.0, "kv/cache_bits_per_element": out["kv/bits_per_element"]})
    out.update(getattr(getattr(setup, "allocator", None), "report", None) or {})
    return out

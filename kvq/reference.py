"""The full-precision reference of a perplexity protocol: what the fp model predicts on the same
windows and tokens, for the distribution metrics of every perplexity run.

* ``test/kl`` -- mean per-token KL(p_fp || p_quant) in nats over the full vocabulary;
* ``test/top1_agree`` -- fraction of scored tokens whose argmax equals the fp argmax;
* ``test/delta_ppl_pct_lo`` / ``test/delta_ppl_pct_hi`` -- a paired 95% interval on the
  perplexity change in percent: a percentile bootstrap over windows (2000 resamples, seed 0),
  each resample taking the *same* windows for the run and for the reference.

What is stored is exact for these metrics and small: per window, the fp model's final hidden
state at every scored position (the input of the output embedding, ``[n_scored, hidden]``, in the
model's dtype) and, computed once from the fp logits when the reference is recorded, per scored
token: the log-partition ``lse_ref`` (float64), the fp argmax, and ``u = s W^T p_ref`` (float32
``[hidden]``: the output embedding ``W`` weighted by the fp distribution, ``s`` the model's linear
logit scale). Then for a run's token with hidden state ``h`` and logits ``z = s W h (+ b)``::

    KL(p_ref || p) = (lse - lse_ref) - (h - h_ref) . u

(``sum_v p_ref,v (z_v - z_ref,v) = s (h - h_ref) . W^T p_ref``; a bias cancels), so a compared
window costs one log-sum-exp of the run's own logits, which the forward computed anyway, and a
dot product per token -- no output-embedding product and no softmax of the fp side per
configuration. ``method=none`` gives ``kl == 0.0`` and ``top1_agree == 1.0`` exactly (the same
logits, the same hidden states). Storage: ``2 x hidden_size x 4 + 16`` bytes per scored token for
the embedded SmolLM2 in fp32 (4.6 KB: 38 MB for 16 windows of 512), ``hidden_size x (2 + 4) + 16``
(24 KB) for a 7B Llama in bf16, instead of ``vocab x 4`` bytes for stored log-probs (196 KB /
128-512 KB). A head that is not linear in the hidden state (Gemma's final soft-capping) keeps no
``u``: its windows are compared in full, both distributions recomputed from the hidden states
with the model's own head (:func:`distribution_stats`).

Layout, keyed like results (the key of the baseline experiment, which includes the protocol)::

    <results_dir>/reference/<baseline key>/index.json          # dtype, hidden size, per-window nll
    <results_dir>/reference/<baseline key>/<digest>.npy        # one window's hidden states
    <results_dir>/reference/<baseline key>/<digest>.lse.npy    # its fp log-partition per token
    <results_dir>/reference/<baseline key>/<digest>.top1.npy   # its fp argmax per token
    <results_dir>/reference/<baseline key>/<digest>.u.npy      # W^T p_ref per token (linear heads)

A window is named by a digest of its token ids, so a run only ever compares the same tokens.
The baseline run writes the reference as a by-product (:func:`attach_reference`); every later
run of the grid, and a resumed grid, reads it (memory-mapped); ``reuse=false`` rewrites it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvq.results import atomic_write

__all__ = [
    "INDEX_FILE",
    "REFERENCE_DIR",
    "Reference",
    "attach_reference",
    "capture_hidden",
    "distribution_metrics",
    "distribution_stats",
    "fp_summary",
    "head_of",
    "linear_head",
    "log_partition",
    "paired_interval",
    "reference_ready",
    "reference_root",
    "summary_stats",
    "window_digest",
]

log = logging.getLogger(__name__)

#: the folder of references under the results store
REFERENCE_DIR = "reference"
#: a reference's index; written last, so its presence means the reference is complete
INDEX_FILE = "index.json"
_VERSION = 2
#: the per-token summaries stored beside a window's hidden states (``u`` only for linear heads)
_PARTS = ("lse", "top1", "u")
#: numpy storage of each torch dtype (bf16 as its raw 16 bits)
_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}
#: the bootstrap: resamples, seed, coverage
N_BOOT, BOOT_SEED, LEVEL = 2000, 0, 0.95


def reference_root(results_dir: Path, key: str) -> Path:
    """``<results_dir>/reference/<key>``: where the reference of baseline experiment ``key`` lives."""
    return Path(results_dir) / REFERENCE_DIR / key


def window_digest(ids: torch.Tensor) -> str:
    """A name for a window's tokens (``ids [B, T]``): the sha256 of the ids and their shape."""
    a = ids.detach().to("cpu", torch.int64).contiguous().numpy()
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()[:24]


def head_of(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``head(hidden [..., H]) -> logits [..., V]``: the model's output embedding and the logit
    transforms transformers applies after it (Gemma's soft-capping, Cohere's ``logit_scale``,
    Granite's ``logits_scaling``).

    Raises:
        ValueError: the model has no output embedding.
    """
    emb = model.get_output_embeddings()
    if emb is None:
        raise ValueError(f"{type(model).__name__} has no output embedding: no distribution metrics")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    mul = getattr(cfg, "logit_scale", None)
    div = getattr(cfg, "logits_scaling", None)

    def head(h: torch.Tensor) -> torch.Tensor:
        x = emb(h)
        if isinstance(mul, (int, float)) and not isinstance(mul, bool):
            x = x * mul
        if isinstance(div, (int, float)) and not isinstance(div, bool):
            x = x / div
        if cap:
            x = torch.tanh(x / cap) * cap
        return x

    return head


def linear_head(model: torch.nn.Module) -> tuple[torch.Tensor, float] | None:
    """``(W [V, H], s)`` when the model's logits are ``s W h`` (+ a bias): its output embedding and
    linear logit scale (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``); ``None`` for a
    head that is not linear in ``h`` (Gemma's final soft-capping)."""
    emb = model.get_output_embeddings()
    if emb is None or not isinstance(getattr(emb, "weight", None), torch.Tensor):
        return None
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(cfg, "final_logit_softcapping", None):
        return None
    scale = 1.0
    mul, div = getattr(cfg, "logit_scale", None), getattr(cfg, "logits_scaling", None)
    if isinstance(mul, (int, float)) and not isinstance(mul, bool):
        scale *= float(mul)
    if isinstance(div, (int, float)) and not isinstance(div, bool):
        scale /= float(div)
    return emb.weight, scale


#: elements per chunk of :func:`log_partition` on CPU (8 MB of float32: the row block stays in cache)
LSE_CHUNK_ELEMENTS = 1 << 21


def log_partition(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dim of ``logits [n, V]`` in float32 -> ``[n]``.

    The same values as ``torch.logsumexp(logits.float(), -1)`` (row by row, the same kernel), on
    CPU over blocks of rows small enough to stay in cache: ~3x faster for a vocabulary of 49k on
    this project's CPU, and no full-size temporaries (``benchmarks/bench_shared.py`` counts it in
    every scored window of a grid).
    """
    z = logits.float()
    if z.device.type != "cpu" or z.dim() != 2 or z.shape[0] == 0:
        return torch.logsumexp(z, dim=-1)
    rows = max(1, LSE_CHUNK_ELEMENTS // max(1, z.shape[1]))
    if rows >= z.shape[0]:
        return torch.logsumexp(z, dim=-1)
    return torch.cat([torch.logsumexp(z[s : s + rows], dim=-1) for s in range(0, z.shape[0], rows)])


def fp_summary(
    logits: torch.Tensor,
    head: tuple[torch.Tensor, float] | None,
    chunk: int = 256,
    lse: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """What a recorded window keeps of its fp distribution, per scored token (module docstring).

    Args:
        logits: the fp model's logits ``[n, V]`` of the scored positions.
        head: :func:`linear_head` (``None``: no ``u``).
        lse: the log-partitions ``[n]`` (float32) when already computed.

    Returns:
        ``lse`` float64 ``[n]``, ``top1`` int64 ``[n]`` and, for a linear head, ``u`` float32 ``[n, H]``.
    """
    z = logits.float()
    lse = log_partition(z) if lse is None else lse.float()
    out = {"lse": lse.double(), "top1": z.argmax(-1)}
    if head is not None:
        W, scale = head
        us = []
        for s in range(0, z.shape[0], chunk):
            p = z[s : s + chunk].softmax(-1)
            us.append((p @ W.float()) * scale)
        out["u"] = torch.cat(us) if us else z.new_zeros(0, W.shape[1])
    return out


def summary_stats(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref: dict[str, torch.Tensor],
    lse: torch.Tensor | None = None,
) -> tuple[float, int]:
    """Summed KL(p_ref || p) and argmax agreements from the stored summary (a linear head):
    ``(lse - lse_ref) - (h - h_ref) . u`` per token, in float64.

    Args:
        hidden: the run's hidden states ``[n, H]``; logits: its logits ``[n, V]``.
        ref_hidden: the reference's ``[n, H]``; ref: its :func:`fp_summary`.
        lse: the run's log-partitions ``[n]`` (float32) when already computed (the nll's).
    """
    z = logits.float()
    lse = (log_partition(z) if lse is None else lse.float()).double()
    dh = hidden.double() - ref_hidden.double()
    kl = (lse - ref["lse"].to(lse.device)) - (dh * ref["u"].to(dh.device).double()).sum(-1)
    agree = int((z.argmax(-1) == ref["top1"].to(z.device)).sum())
    return float(kl.sum()), agree


@contextmanager
def capture_hidden(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the input of the output embedding (``[B, t, H]``) of every forward inside the block.

    Yields:
        The list the hidden states are appended to, one per forward, in call order.
    """
    emb = model.get_output_embeddings()
    seen: list[torch.Tensor] = []
    if emb is None:
        yield seen
        return
    handle = emb.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()


def distribution_stats(
    hidden: torch.Tensor, ref: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], chunk: int = 256
) -> tuple[float, int]:
    """Summed KL(p_ref || p) and the number of argmax agreements over scored tokens.

    Args:
        hidden: the run's final hidden states ``[n, H]``.
        ref: the fp reference's ``[n, H]`` (same tokens, same dtype).
        head: hidden -> logits (:func:`head_of`), applied to both in the same chunks.
        chunk: tokens per chunk (bounds the ``[chunk, V]`` temporaries).

    Returns:
        ``(sum of per-token KL in nats, count of tokens whose argmax agrees)``.
    """
    if hidden.shape != ref.shape:
        raise ValueError(f"reference shape {tuple(ref.shape)} != run's {tuple(hidden.shape)}")
    kl, agree = 0.0, 0
    for s in range(0, hidden.shape[0], chunk):
        lq = head(hidden[s : s + chunk]).float().log_softmax(-1)
        lp = head(ref[s : s + chunk]).float().log_softmax(-1)
        p = lp.exp()
        terms = torch.where(p > 0, p * (lp - lq), torch.zeros((), device=p.device))
        kl += float(terms.sum(dtype=torch.float64))
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
    return kl, agree


def paired_interval(
    nll: Sequence[float],
    ref_nll: Sequence[float],
    tokens: Sequence[int],
    n_boot: int = N_BOOT,
    seed: int = BOOT_SEED,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Paired percentile-bootstrap interval of the perplexity change in percent, over windows.

    Each resample draws windows with replacement and takes the *same* windows for the run and
    the reference: ``100 * (exp((sum nll - sum ref_nll) / sum tokens) - 1)``.

    Args:
        nll: summed nll (nats) per window of the run.
        ref_nll: the same of the reference, window by window.
        tokens: scored tokens per window.
        n_boot: resamples.
        seed: the generator's seed (fixed: the same windows give the same interval).
        level: coverage.

    Returns:
        ``(lo, hi)`` in percent.
    """
    q, b, t = (np.asarray(x, dtype=np.float64) for x in (nll, ref_nll, tokens))
    if not (len(q) == len(b) == len(t)) or len(q) == 0:
        raise ValueError("paired_interval needs one nll, reference nll and token count per window")
    idx = np.random.default_rng(seed).integers(0, len(q), size=(n_boot, len(q)))
    pct = 100.0 * np.expm1((q[idx].sum(1) - b[idx].sum(1)) / t[idx].sum(1))
    a = 100.0 * (1.0 - level) / 2
    lo, hi = np.percentile(pct, [a, 100.0 - a])
    return float(lo), float(hi)


class Reference:
    """The fp reference of one (model, data, protocol), recorded or read window by window.

    Args:
        root: its folder (:func:`reference_root`).
        record: write this run's windows as the reference (the baseline run); otherwise read
            the complete reference there.
    """

    def __init__(self, root: Path, record: bool) -> None:
        self.root = Path(root)
        self.recording = record
        self.missing = 0
        self.dtype: str | None = None
        self.windows: dict[str, dict[str, float]] = {}
        self.linear = False  # a recorded window had a linear head (written to the index)
        self._checked = False
        if not record:
            index = self.read_index(self.root)
            if index is None:
                raise ValueError(f"no complete fp reference in {self.root}")
            self.dtype, self.windows = index["dtype"], index["windows"]

    @staticmethod
    def read_index(root: Path) -> dict[str, Any] | None:
        """The index of a complete reference in ``root`` (``None``: absent, partial or corrupt)."""
        try:
            index = json.loads((Path(root) / INDEX_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(index, dict) or index.get("version") != _VERSION:
            return None
        windows = index.get("windows")
        parts = ("", ".lse", ".top1") + ((".u",) if index.get("linear") else ())
        if not isinstance(windows, dict) or not all(
            (Path(root) / f"{d}{x}.npy").is_file() for d in windows for x in parts
        ):
            return None
        return index

    @classmethod
    def ready(cls, root: Path) -> bool:
        """Whether ``root`` holds a complete reference."""
        return cls.read_index(root) is not None

    def _path(self, digest: str, part: str = "") -> Path:
        return self.root / f"{digest}{'.' + part if part else ''}.npy"

    def _write(self, path: Path, t: torch.Tensor) -> None:
        h = t.detach().cpu().contiguous()
        arr = h.view(torch.int16).numpy() if h.dtype == torch.bfloat16 else h.numpy()
        atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))

    def _save(self, digest: str, hidden: torch.Tensor, summary: dict[str, torch.Tensor]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for part, t in summary.items():  # the summaries first, the hidden states (named in the index) last
            self._write(self._path(digest, part), t)
        self._write(self._path(digest), hidden)

    def _read(self, path: Path) -> torch.Tensor | None:
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return None
        return torch.from_numpy(np.array(arr))  # a copy: the memory map is read-only

    def _load(self, digest: str, like: torch.Tensor) -> torch.Tensor | None:
        t = self._read(self._path(digest))
        if t is None:
            return None
        if like.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.to(like.device)

    def _load_summary(self, digest: str) -> dict[str, torch.Tensor] | None:
        out = {}
        for part in _PARTS:
            t = self._read(self._path(digest, part))
            if t is None:
                return None if part != "u" else out
            out[part] = t
        return out

    def observe(
        self,
        model: torch.nn.Module,
        ids: torch.Tensor,
        hidden: torch.Tensor,
        nll: float,
        tokens: int,
        check: tuple[torch.Tensor, torch.Tensor] | None = None,
        logits: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
    ) -> tuple[str, float, int] | None:
        """One scored window: record it (baseline) and compare it with the reference.

        Args:
            model: the model (its output embedding recomputes the logits).
            ids: the window's tokens ``[B, T]``.
            hidden: final hidden states of the scored positions ``[n, H]``.
            nll: the window's summed nll; tokens: its scored tokens.
            check: ``(hidden row [H], the model's logits for it [V])``: on the first window, the
                logits recomputed from the hidden state must match the model's (else a
                ``ValueError``: the model transforms its logits in a way kvq does not know).
            logits: the model's logits of the scored positions ``[n, V]`` (``None``: recomputed
                from ``hidden`` with the model's head).
            lse: their log-partitions ``[n]`` when the caller computed them (the nll's).

        Returns:
            ``(digest, summed KL, argmax agreements)``, or ``None`` when the reference lacks the
            window (or was computed in another dtype).
        """
        head = head_of(model)
        if check is not None and not self._checked:
            h_row, logits_row = check
            mine, theirs = head(h_row).float(), logits_row.float()
            if not (torch.isfinite(mine).all() and torch.isfinite(theirs).all()):
                return None  # non-finite logits: the run's own check reports them (NonFiniteKVError)
            if not torch.allclose(mine, theirs, rtol=1e-2, atol=1e-2 * float(theirs.abs().max()) + 1e-4):
                raise ValueError(
                    f"distribution metrics: {type(model).__name__}'s logits are not its output embedding of the "
                    "last hidden state (an unknown logit transform); kvq cannot recompute its fp distribution"
                )
            self._checked = True
        digest = window_digest(ids)
        dtype = str(hidden.dtype).removeprefix("torch.")
        linear = linear_head(model)
        if logits is None:
            logits = torch.cat([head(hidden[s : s + 256]) for s in range(0, hidden.shape[0], 256)])
        if lse is None:  # one log-partition per token, the same function for the run and the reference
            lse = log_partition(logits)
        if self.recording:
            self._save(digest, hidden, fp_summary(logits, linear, lse=lse))
            self.windows[digest] = {"nll": float(nll), "tokens": int(tokens)}
            self.dtype, self.linear = dtype, linear is not None
        elif self.dtype != dtype:
            if not self.missing:
                log.warning(
                    "the fp reference in %s holds %s hidden states, this run computes in %s: no distribution "
                    "metrics (recompute the reference with reuse=false)",
                    self.root,
                    self.dtype,
                    dtype,
                )
            self.missing += 1
            return None
        ref = self._load(digest, hidden) if digest in self.windows else None
        summary = self._load_summary(digest) if ref is not None else None
        if ref is None or summary is None:
            self.missing += 1
            return None
        if ref.shape != hidden.shape:
            raise ValueError(f"reference shape {tuple(ref.shape)} != run's {tuple(hidden.shape)}")
        if linear is not None and "u" in summary:
            kl, agree = summary_stats(hidden, logits, ref, summary, lse=lse)
        else:  # a head that is not linear in h: both distributions in full
            kl, agree = distribution_stats(hidden, ref, head)
        return digest, kl, agree

    def baseline(self, digest: str) -> tuple[float, int] | None:
        """The reference's ``(summed nll, scored tokens)`` of a window, or ``None``."""
        w = self.windows.get(digest)
        return None if w is None else (float(w["nll"]), int(w["tokens"]))

    def finish(self) -> None:
        """Write the index of a recorded reference (atomically, last: the reference is complete)."""
        if not self.recording or not self.windows:
            return
        hidden = None
        with suppress(OSError, ValueError):
            hidden = int(np.load(self._path(next(iter(self.windows))), mmap_mode="r").shape[-1])
        files = [self._path(d, x) for d in self.windows for x in ("", *_PARTS)]
        stored = sum(f.stat().st_size for f in files if f.exists())
        index = {
            "version": _VERSION,
            "dtype": self.dtype,
            "hidden_size": hidden,
            "linear": self.linear,
            "tokens": sum(int(w["tokens"]) for w in self.windows.values()),
            "bytes": stored,
            "windows": self.windows,
        }
        atomic_write(self.root / INDEX_FILE, lambda f: json.dump(index, f, indent=1), text=True)
        log.info("fp reference: %d windows, %d bytes in %s", len(self.windows), stored, self.root)


def distribution_metrics(results: Sequence[Any], reference: Reference | None) -> dict[str, float]:
    """``test/kl``, ``test/top1_agree``, ``test/delta_ppl_pct_lo`` / ``_hi`` from scored windows.

    Args:
        results: per-window results with ``nll``, ``tokens``, ``kl``, ``agree``, ``digest``
            (:class:`kvq.protocols.WindowResult`).
        reference: the reference they were compared with (its per-window nll pairs the interval).

    Returns:
        The four metrics (plus ``test/ref_windows``), or ``{}`` when a window was not compared.
    """
    if reference is None or not results:
        return {}
    if any(getattr(w, "kl", None) is None for w in results):
        n = sum(getattr(w, "kl", None) is None for w in results)
        log.warning(
            "the fp reference in %s does not cover %d of the %d windows: no distribution metrics "
            "(recompute it with reuse=false)",
            reference.root,
            n,
            len(results),
        )
        return {}
    tokens = sum(w.tokens for w in results)
    out = {
        "test/kl": sum(w.kl for w in results) / tokens,
        "test/top1_agree": sum(w.agree for w in results) / tokens,
        "test/ref_windows": float(len(results)),
    }
    base = [reference.baseline(w.digest) for w in results]
    if all(b is not None for b in base):
        lo, hi = paired_interval(
            [w.nll for w in results],
            [b[0] for b in base if b is not None],
            [w.tokens for w in results],
        )
        out["test/delta_ppl_pct_lo"], out["test/delta_ppl_pct_hi"] = lo, hi
    return {k: v for k, v in out.items() if math.isfinite(v)}


def reference_ready(point: Any, results_dir: Path, key: str) -> bool:
    """Whether the baseline of ``point`` has what its protocol needs (a complete reference, or a
    protocol without one)."""
    if not getattr(point.eval, "uses_reference", False):
        return True
    return Reference.ready(reference_root(results_dir, key))


def attach_reference(point: Any, results_dir: Path, key: str, reuse: bool = True) -> Reference | None:
    """Give ``point.eval`` the fp reference it records or compares with (``point.eval.reference``).

    A full-precision run (``method=none``: the baseline) records the reference when there is no
    complete one (or ``reuse`` is off) and compares with it either way (KL 0, agreement 1); a
    quantized run compares with the complete reference its baseline wrote (none: a warning, no
    distribution metrics). Protocols without distribution metrics get nothing.

    Args:
        point: the run's :class:`kvq.experiment.Point`.
        results_dir: the results store's folder.
        key: the experiment key of the run's baseline (``experiment_key(baseline_config(cfg), meta)``).
        reuse: ``cfg.reuse`` (``False``: a baseline rewrites its reference).
    """
    proto = point.eval
    if not getattr(proto, "uses_reference", False):
        return None
    root = reference_root(results_dir, key)
    ready = Reference.ready(root)
    if point.method.quantizes and not ready:
        log.warning("no fp reference in %s: no distribution metrics for this run", root)
        proto.reference = None
        return None
    record = not point.method.quantizes and (not reuse or not ready)
    proto.reference = Reference(root, record=record)
    return proto.reference

"""Long-context retrieval through the quantized cache, offline: ``eval=passkey`` and ``eval=needle``.

* :class:`Passkey` -- a random 5-digit key at a depth of repeated filler text ("The grass is
  green. The sky is blue. ..."), as in Landmark Attention / LongLoRA's passkey test;
* :class:`Needle` -- a needle sentence ("One of the special magic numbers for <word> is:
  <7 digits>.", RULER's single-needle template) at a depth of real text: the ``data`` node's text
  (the embedded pydoc text by default, ``data=local data.path=...`` for yours).

Both build their prompts from the tokenizer at every length x depth x trial (``eval.lengths``,
``eval.depths``, ``eval.trials``), seeded (``eval.seed``, the run's ``seed`` by default): the same
seed gives the same prompts. A prompt is **prefilled** in full precision into a deferred cache,
the whole cache is then **quantized as the cache would hold it** (sinks and the residual window
in full precision, attention-aware bits from that prefill, ``granularity=token`` possible), and
the answer is **decoded greedily** with ``model.generate(..., cache=cache)``: every answer token
attends to the quantized prompt (the answer's own few tokens stay in full precision). This is how
a deployed quantized cache serves a long prompt (the prefill's attention sees its own K/V in
full precision, as flash attention over a fresh prompt does); ``eval=fakequant`` is where every
query sees quantized K/V.

An answer is right when the first number in the generated text is the hidden one
(:func:`score_answer`). Metrics: ``test/<name>_acc`` overall, ``test/<name>_acc/len_<L>`` per
length, ``test/<name>_acc/len_<L>/depth_<D>`` per cell (``D`` in percent), the mean prompt
length per length (``test/<name>_tokens/len_<L>``), and the cache's ``kv/*`` figures.
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvq.memory import kv_figures, measured
from kvq.protocols.base import Batches, Protocol, layer_bits
from kvq.protocols.setup import KVSetup
from kvq.reference import window_digest

__all__ = [
    "NEEDLE_WORDS",
    "Needle",
    "Passkey",
    "Prompt",
    "Retrieval",
    "RetrievalResult",
    "depth_label",
    "score_answer",
]

log = logging.getLogger(__name__)

#: the keys of the needle prompts (one drawn per prompt)
NEEDLE_WORDS: tuple[str, ...] = (
    "amber-falcon", "silent-harbor", "copper-lantern", "velvet-canyon", "frozen-orchard",
    "crimson-meadow", "hollow-summit", "golden-thicket", "restless-river", "marble-garden",
    "quiet-glacier", "scarlet-prairie", "wandering-comet", "ivory-tower", "emerald-valley",
    "broken-compass", "distant-island", "hidden-temple", "rusty-anchor", "silver-forest",
)  # fmt: skip


def score_answer(answer: str, text: str) -> bool:
    """Whether the first number in ``text`` is ``answer`` (``" 71432. Remember"`` -> ``71432``)."""
    m = re.search(r"\d+", text)
    return m is not None and m.group() == answer


def depth_label(depth: float) -> str:
    """A depth (fraction of the prompt) as a metric key part: ``0.25 -> "25"`` (percent)."""
    return f"{100 * depth:g}"


@dataclass
class Prompt:
    """One retrieval prompt.

    Attributes:
        ids: the prompt's token ids ``[T]``.
        answer: the hidden number, as text.
        length: the requested length (tokens); ``depth``: where the needle sits (0 = first);
        trial: the trial index.
    """

    ids: torch.Tensor
    answer: str
    length: int
    depth: float
    trial: int


@dataclass
class RetrievalResult:
    """One prompt's outcome: the cell, the answer and what the model generated, the cache."""

    length: int
    depth: float
    trial: int
    correct: bool
    answer: str
    output: str
    tokens: int
    kv_bytes: int
    kv_elements: int
    bits: dict[str, list[float]] = field(default_factory=dict)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _too_short(name: str, length: int, fixed: int) -> str:
    return (
        f"eval={name}: a prompt of eval.lengths={length} tokens cannot hold its fixed text "
        f"({fixed} tokens with this tokenizer): use lengths >= {fixed}"
    )


def _bos(tokenizer: Any) -> list[int]:
    from kvq.models.meta import tokenizer_adds_bos

    bos = getattr(tokenizer, "bos_token_id", None)
    return [int(bos)] if bos is not None and tokenizer_adds_bos(tokenizer) else []


@dataclass
class Retrieval(Protocol):
    """Base of the retrieval protocols (see the module docstring).

    Args:
        lengths: prompt lengths in tokens (each prompt is at most this long).
        depths: where the needle sits, as a fraction of the prompt (0 = start, 1 = end).
        trials: prompts per (length, depth), each with its own key (and haystack offset).
        seed: seeds the keys (and offsets); the same seed gives the same prompts.
        max_new_tokens: tokens generated for the answer.
    """

    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2
    seed: int = 0
    max_new_tokens: int = 8

    #: the metric prefix (``test/<name>_acc``)
    name: ClassVar[str] = "retrieval"
    has_baseline: ClassVar[bool] = False
    context_knob: ClassVar[str] = "the longest of eval.lengths + eval.max_new_tokens"

    def __post_init__(self) -> None:
        if not self.lengths or any(int(n) < 16 for n in self.lengths):
            raise ValueError(
                f"eval.lengths must be a non-empty list of lengths >= 16 tokens, got {self.lengths}"
            )
        if not self.depths or any(not 0.0 <= float(d) <= 1.0 for d in self.depths):
            raise ValueError(f"eval.depths must be fractions in [0, 1], got {self.depths}")
        if self.trials < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"eval.trials and eval.max_new_tokens must be >= 1, got {self.trials} and {self.max_new_tokens}"
            )
        self.lengths = [int(n) for n in self.lengths]
        self.depths = [float(d) for d in self.depths]
        self._tokenizer: Any = None
        self._prompts: dict[str, Prompt] = {}

    # -- what the validator asks ------------------------------------------------------------
    @property
    def quantizes_whole_cache(self) -> bool:
        return True

    def cached_tokens(self, seq_len: int) -> int:
        return max(self.lengths)

    def context_tokens(self, seq_len: int) -> int:
        return max(self.lengths) + self.max_new_tokens

    def split(self, T: int) -> int:
        """Prompt tokens prefilled before the whole cache is quantized, of a prompt of ``T``: all
        but the last, which ``generate`` feeds as the first decoding step."""
        if T < 2:
            raise ValueError(f"eval={self.name}: a prompt needs at least 2 tokens, got {T}")
        return T - 1

    # -- prompts ----------------------------------------------------------------------------
    def rng(self, length: int, depth: float, trial: int) -> random.Random:
        """The generator of one prompt (its key, its haystack offset)."""
        return random.Random(f"{self.name}:{self.seed}:{length}:{depth!r}:{trial}")

    def prompts(self, tokenizer: Any, source: Any = None, cache_dir: str | None = None) -> list[Prompt]:
        """Every prompt, length-major, then depth, then trial."""
        raise NotImplementedError

    def datamodule(self, source: Any, tokenizer: Any, cache_dir: str | None = None) -> Batches:
        """One batch per prompt: ``{"input_ids": LongTensor[1, T]}``."""
        self._tokenizer = tokenizer
        prompts = self.prompts(tokenizer, source, cache_dir)
        self._prompts = {window_digest(p.ids[None]): p for p in prompts}
        return Batches([{"input_ids": p.ids[None]} for p in prompts])

    # -- scoring ----------------------------------------------------------------------------
    def score(self, model: torch.nn.Module, ids: torch.Tensor, kv: KVSetup) -> RetrievalResult:
        """Prefill the prompt, quantize the cache, decode the answer greedily.

        Args:
            ids: one prompt ``[1, T]`` (from :meth:`datamodule`).
        """
        prompt = self._prompts.get(window_digest(ids))
        if prompt is None:
            raise ValueError(f"eval={self.name}: a batch that is not one of this protocol's prompts")
        T = ids.shape[1]
        P = self.split(T)
        cache = kv.prefilled(model, ids[:, :P])
        m = measured(cache)
        bits = cache.mean_bits_per_layer()
        tok = self._tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            cache=cache,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
        )
        text = tok.decode(out[0, T:], skip_special_tokens=True)
        ok = score_answer(prompt.answer, text)
        log.debug("%s len %d depth %g: %r -> %r (%s)", self.name, T, prompt.depth, prompt.answer, text, ok)
        return RetrievalResult(
            prompt.length, prompt.depth, prompt.trial, ok, prompt.answer, text, T, m.bytes, m.elements, bits
        )

    def progress(self, result: RetrievalResult) -> dict[str, float]:
        return {f"test/{self.name}_correct": float(result.correct)}

    def aggregate(self, results: list[RetrievalResult], elapsed: float) -> dict[str, float]:
        """Accuracy overall, per length and per (length, depth); prompt lengths; the cache."""
        n = self.name
        out: dict[str, float] = {}
        if results:
            out[f"test/{n}_acc"] = sum(r.correct for r in results) / len(results)
        out[f"test/{n}_prompts"] = float(len(results))
        for length in self.lengths:
            rs = [r for r in results if r.length == length]
            if not rs:
                continue
            out[f"test/{n}_acc/len_{length}"] = sum(r.correct for r in rs) / len(rs)
            out[f"test/{n}_tokens/len_{length}"] = sum(r.tokens for r in rs) / len(rs)
            for depth in self.depths:
                cell = [r for r in rs if r.depth == depth]
                if cell:
                    key = f"test/{n}_acc/len_{length}/depth_{depth_label(depth)}"
                    out[key] = sum(r.correct for r in cell) / len(cell)
        nbytes, elements = sum(r.kv_bytes for r in results), sum(r.kv_elements for r in results)
        if nbytes and elements:
            out.update(kv_figures(float(nbytes), float(elements), len(results)))
        out.update(layer_bits(results))  # type: ignore[arg-type]
        out["time/eval_s"] = elapsed
        if elapsed > 0:
            out["time/tokens_per_s"] = sum(r.tokens for r in results) / elapsed
        return {k: v for k, v in out.items() if math.isfinite(v)}


@dataclass
class Passkey(Retrieval):
    """A 5-digit pass key hidden in repeated filler text (see the module docstring)."""

    name: ClassVar[str] = "passkey"
    INTRO: ClassVar[str] = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there."
    )
    FILLER: ClassVar[str] = (
        " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    )
    NEEDLE: ClassVar[str] = " The pass key is {key}. Remember it. {key} is the pass key."
    #: on its own line: right after the key (depth 1) a small model otherwise continues the
    #: sentence pattern ("... is the pass key. What is the pass key? The pass key is the pass key.")
    QUESTION: ClassVar[str] = "\nWhat is the pass key? The pass key is"

    def prompt(self, tokenizer: Any, length: int, depth: float, trial: int) -> Prompt:
        """The prompt of one cell and trial: whole filler sentences around the key, at most ``length`` tokens."""
        key = str(self.rng(length, depth, trial).randint(10000, 99999))
        head = _bos(tokenizer) + _ids(tokenizer, self.INTRO)
        needle = _ids(tokenizer, self.NEEDLE.format(key=key))
        question = _ids(tokenizer, self.QUESTION)
        unit = _ids(tokenizer, self.FILLER)
        fixed = len(head) + len(needle) + len(question)
        if fixed > length:
            raise ValueError(_too_short(self.name, length, fixed))
        n_units = (length - fixed) // len(unit)
        before = round(depth * n_units)
        ids = head + unit * before + needle + unit * (n_units - before) + question
        return Prompt(torch.tensor(ids, dtype=torch.long), key, length, depth, trial)

    def prompts(self, tokenizer: Any, source: Any = None, cache_dir: str | None = None) -> list[Prompt]:
        return [
            self.prompt(tokenizer, n, d, t)
            for n in self.lengths
            for d in self.depths
            for t in range(self.trials)
        ]


@dataclass
class Needle(Retrieval):
    """A needle sentence with a 7-digit number in real text (see the module docstring)."""

    name: ClassVar[str] = "needle"
    INTRO: ClassVar[str] = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\n"
    )
    NEEDLE: ClassVar[str] = "\nOne of the special magic numbers for {word} is: {value}.\n"
    QUESTION: ClassVar[str] = (
        "\nWhat is the special magic number for {word} mentioned in the provided text? "
        "The special magic number for {word} mentioned in the provided text is"
    )
    #: how far back (tokens) an insertion point moves to land after a sentence or line end
    SNAP: ClassVar[int] = 64

    def prompt(self, tokenizer: Any, haystack: torch.Tensor, length: int, depth: float, trial: int) -> Prompt:
        """The prompt of one cell and trial: exactly ``length`` tokens, the needle after the
        sentence end nearest before the requested depth of a seeded slice of ``haystack``."""
        rng = self.rng(length, depth, trial)
        word, value = rng.choice(NEEDLE_WORDS), str(rng.randint(1_000_000, 9_999_999))
        head = _bos(tokenizer) + _ids(tokenizer, self.INTRO)
        needle = _ids(tokenizer, self.NEEDLE.format(word=word, value=value))
        question = _ids(tokenizer, self.QUESTION.format(word=word))
        n_hay = length - len(head) - len(needle) - len(question)
        if n_hay < 1:
            raise ValueError(_too_short(self.name, length, length - n_hay + 1))
        if haystack.numel() < n_hay:
            raise ValueError(
                f"eval=needle needs {n_hay} haystack tokens for a prompt of {length}, the data text has "
                f"{haystack.numel()}: use shorter eval.lengths or a longer data text (data=local data.path=...)"
            )
        start = rng.randint(0, haystack.numel() - n_hay)
        hay = [int(t) for t in haystack[start : start + n_hay]]
        at = round(depth * n_hay)
        for j in range(at, max(at - self.SNAP, 0), -1):
            if tokenizer.decode(hay[j - 1 : j]).endswith((".", "\n", ". ")):
                at = j
                break
        ids = head + hay[:at] + needle + hay[at:] + question
        return Prompt(torch.tensor(ids, dtype=torch.long), value, length, depth, trial)

    def prompts(self, tokenizer: Any, source: Any = None, cache_dir: str | None = None) -> list[Prompt]:
        if source is None:
            from kvq.data import PyDoc

            source = PyDoc()
        haystack = source.datamodule(tokenizer, cache_dir=cache_dir).token_ids
        return [
            self.prompt(tokenizer, haystack, n, d, t)
            for n in self.lengths
            for d in self.depths
            for t in range(self.trials)
        ]

"""What the benchmarks share: the evaluation text and the way results are written."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from kvq.data import LocalText, PyDoc

#: the WikiText-2 raw test split beside the repository (``../shared/data``), never copied into it
WIKITEXT2_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def eval_windows(
    tokenizer: Any, windows: int, seq_len: int = 512, require_wikitext: bool = False
) -> torch.Tensor:
    """``[windows, seq_len]`` token windows of WikiText-2 (the embedded pydoc text when it is absent).

    Args:
        tokenizer: the model's tokenizer.
        windows: how many non-overlapping windows.
        seq_len: tokens per window.
        require_wikitext: fail (one line) instead of falling back to pydoc.
    """
    if WIKITEXT2_TEST.exists():
        src: LocalText | PyDoc = LocalText(path=str(WIKITEXT2_TEST))
    elif require_wikitext:
        raise SystemExit(f"benchmark: {WIKITEXT2_TEST} is missing (../shared/data beside the repository)")
    else:
        src = PyDoc()
    src.seq_len, src.max_windows = seq_len, windows
    return src.datamodule(tokenizer).windows


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    """Write ``result`` (plus the machine facts that make it comparable) as JSON to ``path``."""
    out = {**result, "torch_threads": torch.get_num_threads(), "machine": platform.machine()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")

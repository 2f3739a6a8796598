"""Evaluate one KV-cache quantization configuration (or a grid with -m).

    python train_eval.py method=adaptive grouping=g128
    python train_eval.py -m method=uniform,adaptive bits=b4,attn

See README.md and conf/ for every option.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import kvq.config  # noqa: F401  -- registers the structured-config schemas
from kvq.cli import entry_point, hydra_main


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entry point: compose -> ``kvq.run`` -> ``test/ppl`` (for sweepers)."""
    return entry_point(cfg)


if __name__ == "__main__":
    sys.exit(hydra_main(main))

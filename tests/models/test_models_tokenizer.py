"""Tokenizer factory and loading: from_pretrained round trip, chat template, pad fix-up and errors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from alignflow.models import ModelLoadError, default_corpus, load_tokenizer, train_bpe_tokenizer


def test_round_trip_through_from_pretrained(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = load_tokenizer(tiny_dir)
    assert len(tok) == 400
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert tok.pad_token_id != tok.eos_token_id
    text = "The annotator rated two answers carefully. Item 42 costs $7.5 — ünïcödé 🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: any string survives
    # A second, independent load through plain transformers gives the same ids.
    assert AutoTokenizer.from_pretrained(str(tiny_dir))(text, add_special_tokens=False)["input_ids"] == ids


def test_chat_template_saved_and_applied(tiny_dir: Path) -> None:
    assert (tiny_dir / "chat_template.jinja").is_file()
    tok = load_tokenizer(tiny_dir)
    msgs = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|bos|><|user|>\nhi there<|eos|>\n<|assistant|>\nhello<|eos|>\n"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    # Role markers are special tokens, so they are single ids.
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids


def test_padding_side(tiny_dir: Path) -> None:
    left = load_tokenizer(tiny_dir, padding_side="left")
    batch = left(["a", "a much longer sentence here"], padding=True)
    assert batch["input_ids"][0][0] == left.pad_token_id
    right = load_tokenizer(tiny_dir, padding_side="right")
    assert right(["a", "a much longer sentence here"], padding=True)["input_ids"][0][-1] == right.pad_token_id


def _strip_token(src: Path, dst: Path, field: str) -> Path:
    shutil.copytree(src, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop(field, None)
    cfg_path.write_text(json.dumps(cfg))
    return dst


def test_no_pad_token_falls_back_to_eos_with_warning(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = _strip_token(tiny_dir, tmp_path / "nopad", "pad_token")
    with caplog.at_level(logging.WARNING, logger="alignflow.models.loading"):
        tok = load_tokenizer(d)
    assert tok.pad_token == tok.eos_token == "<|eos|>"
    assert any("no pad token" in r.getMessage() and str(d) in r.getMessage() for r in caplog.records)


def test_no_pad_and_no_eos_is_an_error(tiny_dir: Path, tmp_path: Path) -> None:
    d = _strip_token(tiny_dir, tmp_path / "nopad", "pad_token")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("eos_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="neither a pad token nor an eos token"):
        load_tokenizer(d)


def test_missing_tokenizer_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_bpe_vocab_size_and_validation() -> None:
    tok = train_bpe_tokenizer(default_corpus(500), vocab_size=300)
    assert len(tok) == 300
    with pytest.raises(ValueError, match="byte alphabet"):
        train_bpe_tokenizer(["x"], vocab_size=100)

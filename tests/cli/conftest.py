"""Shared pieces of the CLI tests: one torch thread, a pair of tiny policies, the console script in-process."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on 2 shared cores
    yield
    torch.set_num_threads(old)


def two_policies(root: Path, hidden_size: int, num_layers: int) -> tuple[Path, Path]:
    """Two tiny Llama policies with one tokenizer and different weights (seed 0 and seed 7)."""
    from transformers import AutoTokenizer

    from alignflow.models import make_tiny_model_dir
    from alignflow.models.tiny import tiny_llama

    a = make_tiny_model_dir(root / "policy-a", vocab_size=400, hidden_size=hidden_size, num_layers=num_layers)
    b = root / "policy-b"
    shutil.copytree(a, b)
    tok = AutoTokenizer.from_pretrained(a)
    tiny_llama(
        vocab_size=len(tok), hidden_size=hidden_size, num_layers=num_layers, num_heads=4,
        max_position_embeddings=512, seed=7,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    ).save_pretrained(str(b))  # fmt: skip
    return a, b


def alignflow(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: Any
) -> tuple[int, str, str]:
    """Run `alignflow ARGS` as the console script does; returns (exit code, stdout, stderr)."""
    from alignflow.cli.main import main

    monkeypatch.setattr(sys, "argv", ["alignflow", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    code = exit_info.value.code  # SystemExit(None) is success, a message (str) is failure
    return (0 if code is None else code if isinstance(code, int) else 1), out.out, out.err

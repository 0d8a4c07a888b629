"""A tiny Llama + BPE tokenizer built once per session; one intra-op thread (tiny matmuls on shared cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from alignflow.models import make_tiny_model_dir

    return make_tiny_model_dir(
        tmp_path_factory.mktemp("tiny") / "model", vocab_size=400, hidden_size=64, num_layers=2
    )


@pytest.fixture(autouse=True)
def _one_thread():
    # With other processes on 2 cores, multi-threaded tiny matmuls spin and run ~20x slower.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tok(tiny_dir: Path):
    from alignflow.models import load_tokenizer

    return load_tokenizer(tiny_dir, padding_side="left")


@pytest.fixture(scope="session")
def model(tiny_dir: Path):
    from alignflow.models import load_policy

    return load_policy(tiny_dir, dtype="float32").eval()

"""A tiny tokenizer + Llama saved once per session, loaded back through from_pretrained by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from alignflow.models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), vocab_size=400, hidden_size=32, num_layers=2)

"""Fixtures for the recipe tests: a tiny Llama + tokenizer built once per session, toy data, a CLI runner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from . import toy

MODEL = {"hidden_size": 64, "num_layers": 2, "vocab_size": 400}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from alignflow.models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), **MODEL)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("toy-data")
    return {
        "sft": toy.write_jsonl(d / "sft.jsonl", toy.sft_rows(48)),
        "pairs": toy.write_jsonl(d / "pairs.jsonl", toy.pair_rows(48)),
        "rankings": toy.write_jsonl(d / "rankings.jsonl", toy.ranking_rows(16)),
    }


def base_config(stage: str, model: Path, data_file: Path, out: Path, **sections: Any) -> dict[str, Any]:
    """A small, fast config for `stage`; `sections` are merged over the defaults one level deep."""
    cfg: dict[str, Any] = {
        "stage": stage,
        "output_dir": str(out),
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": str(data_file), "eval_fraction": 0.25, "max_length": 64},
        "optim": {"lr": 2e-3, "scheduler": "constant"},
        "train": {"seed": 0, "batch_size": 8, "max_steps": 6},
    }
    for key, val in sections.items():
        if isinstance(val, dict):
            cfg.setdefault(key, {}).update(val)
        else:
            cfg[key] = val
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def train_metrics(run_dir: Path, key: str = "loss") -> list[float]:
    return [m[key] for m in read_metrics(run_dir) if key in m and m["step"] > 0]


@pytest.fixture
def cli(sqlite_workspace):  # noqa: ANN001, ANN201 - pytest fixture
    """Invoke `alignflow ...` in-process through the real Typer app; returns the CliRunner result."""
    from typer.testing import CliRunner

    from alignflow.cli.main import app

    runner = CliRunner()

    def invoke(*args: str):  # noqa: ANN202
        return runner.invoke(app, [str(a) for a in args])

    return invoke

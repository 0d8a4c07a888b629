"""Config errors never echo a value that came from `${ENV:...}`, whether the placeholder sat in the
YAML file or in an override; they name the field and the variable instead."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import model_validator

from alignflow.config import (
    OptimSection,
    StageConfig,
    StrictModel,
    TrainSection,
    load_config,
    validate_config,
)
from alignflow.errors import ConfigError

SECRET = "hunter2-SECRET"


class Judge(StrictModel):
    url: str = "http://localhost"
    retries: int = 3

    @model_validator(mode="after")
    def _quotes_its_input(self) -> Judge:
        # A validator message that quotes the value it checked, as real validators do.
        if not self.url.startswith("https://"):
            raise ValueError(f"url must use https, got {self.url!r} (retries {self.retries})")
        return self


class SecretsConfig(StageConfig):
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    judge: Judge = Judge(url="https://x")


def _error(tmp_path: Path, yaml_text: str, overrides: tuple[str, ...] = ()) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text("stage: s\n" + yaml_text)
    with pytest.raises(ConfigError) as exc:
        load_config(p, overrides, schema=SecretsConfig)
    return str(exc.value)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AF_SECRET", SECRET)
    monkeypatch.setenv("AF_SHORT", "7")


def test_placeholder_in_the_file_names_field_and_variable_not_value(tmp_path: Path) -> None:
    msg = _error(tmp_path, "optim:\n  lr: ${ENV:AF_SECRET}\n")
    assert SECRET not in msg and "hunter2" not in msg
    assert f"{tmp_path / 'cfg.yaml'}:3: optim.lr: Input should be a valid number" in msg
    assert "(the value comes from ${ENV:AF_SECRET} and is not shown)" in msg


def test_placeholder_in_an_override(tmp_path: Path) -> None:
    msg = _error(tmp_path, "", overrides=("optim.lr=${ENV:AF_SECRET}",))
    assert SECRET not in msg
    assert "optim.lr:" in msg and "${ENV:AF_SECRET}" in msg


def test_embedded_in_a_longer_string_and_in_a_list(tmp_path: Path) -> None:
    msg = _error(
        tmp_path, 'train:\n  batch_size: "n-${ENV:AF_SECRET}"\noptim:\n  betas: ["${ENV:AF_SECRET}", 0.9]\n'
    )
    assert SECRET not in msg
    assert "train.batch_size:" in msg and "optim.betas.0:" in msg
    assert msg.count("is not shown") == 2


def test_a_validator_quoting_the_value_is_redacted(tmp_path: Path) -> None:
    msg = _error(
        tmp_path,
        "judge:\n  url: http://${ENV:AF_SECRET}.example\n",
        overrides=("judge.retries=${ENV:AF_SHORT}",),
    )
    assert SECRET not in msg
    assert "url must use https, got 'http://***.example' (retries ***)" in msg


def test_a_short_value_does_not_garble_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AF_ZERO", "0")
    msg = _error(tmp_path, "train:\n  batch_size: ${ENV:AF_ZERO}\n")
    assert "train.batch_size: Input should be greater than 0 (the value comes from ${ENV:AF_ZERO}" in msg


def test_values_typed_in_the_file_are_still_echoed(tmp_path: Path) -> None:
    # Only environment values are hidden; a typo in the file is shown so it can be found.
    msg = _error(tmp_path, "optim:\n  lr: fast\n")
    assert "optim.lr: Input should be a valid number" in msg and "(got 'fast')" in msg


def test_pipeline_style_validation_without_a_file() -> None:
    with pytest.raises(ConfigError) as exc:
        validate_config(
            {"stage": "s", "optim": {"eps": "${ENV:AF_SECRET}"}}, SecretsConfig, source="stage 'x'"
        )
    assert SECRET not in str(exc.value) and "stage 'x': optim.eps:" in str(exc.value)


def test_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from alignflow.cli.main import main

    cfg = tmp_path / "sft.yaml"
    cfg.write_text("stage: sft\nmodel:\n  path: /nonexistent\ndata:\n  train: x.jsonl\n")
    monkeypatch.setattr(sys, "argv", ["alignflow", "sft", str(cfg), "optim.lr=${ENV:AF_SECRET}"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "optim.lr:" in err and "${ENV:AF_SECRET}" in err and SECRET not in err

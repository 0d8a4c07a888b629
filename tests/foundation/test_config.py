"""Config loading: strict keys, field paths with file and line, overrides, ${ENV:...} secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignflow.config import (
    DataSection,
    ModelSection,
    OptimSection,
    StageConfig,
    StrictModel,
    apply_overrides,
    load_config,
    parse_override,
    register_stage,
    to_record,
)
from alignflow.errors import ConfigError


class Secrets(StrictModel):
    api_key: str = ""


@register_stage("_test_stage")
class DemoConfig(StageConfig):
    model: ModelSection
    data: DataSection
    optim: OptimSection = OptimSection()
    judge: Secrets = Secrets()


GOOD = """\
stage: _test_stage
model:
  path: /models/tiny
data:
  train: data.jsonl
optim:
  lr: 0.001
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_valid_config_fills_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert isinstance(cfg, DemoConfig)
    assert cfg.optim.lr == 0.001
    assert cfg.optim.scheduler == "cosine"  # a default from the model, not the file
    assert to_record(cfg)["data"]["max_length"] == 512


def test_unknown_key_names_file_line_and_path(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD + "  lrr: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert f"{p}:8: optim.lrr: unknown key" in msg


def test_wrong_type_names_path_and_value(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("lr: 0.001", "lr: fast"))
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert f"{p}:7: optim.lr:" in str(exc.value)
    assert "'fast'" in str(exc.value)


def test_missing_required_field(tmp_path: Path) -> None:
    p = write(tmp_path, "stage: _test_stage\nmodel:\n  path: x\n")
    with pytest.raises(ConfigError, match=r"data: required field is missing"):
        load_config(p)


def test_missing_file_and_unknown_stage(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="stage: expected one of"):
        load_config(write(tmp_path, "stage: nope\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))


def test_overrides_apply_and_are_validated(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD)
    cfg = load_config(p, overrides=["optim.lr=1e-4", "data.packing=true", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.data.packing is True
    assert cfg.optim.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match=r"optim\.nonsense: unknown key"):
        load_config(p, overrides=["optim.nonsense=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(p, overrides=["optim.lr"])
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])
    assert parse_override("train.max_steps=10") == (["train", "max_steps"], 10)


def test_env_interpolation_keeps_secret_out_of_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = write(tmp_path, GOOD + "judge:\n  api_key: ${ENV:AF_TEST_KEY}\n")
    monkeypatch.setenv("AF_TEST_KEY", "s3cret")
    cfg = load_config(p)
    assert cfg.judge.api_key == "s3cret"
    record = to_record(cfg)
    assert record["judge"]["api_key"] == "${ENV:AF_TEST_KEY}"
    assert "s3cret" not in repr(record)
    monkeypatch.delenv("AF_TEST_KEY")
    with pytest.raises(ConfigError, match=r"judge\.api_key: environment variable AF_TEST_KEY is not set"):
        load_config(p)

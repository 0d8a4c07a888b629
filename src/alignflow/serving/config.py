"""`deploy.yaml`: the gateway's typed config (models, experiments, limits, logging), loaded like stage configs.

Loading goes through `alignflow.config` (unknown keys fail with file, line and dotted field; `${ENV:NAME}`
is substituted at load time and never echoed in errors). Checks that span fields (an arm naming a model that
is not declared, two models with one name) run after validation and are reported the same way.

The request's `model` field names either a model (served directly, no arm) or an experiment (an arm is
chosen by `experiments.Router`); the two namespaces therefore must not overlap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from alignflow.config import StrictModel, _yaml_lines, apply_overrides, to_record, validate_config
from alignflow.errors import ConfigError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$"
# Request fields a segment rule may test besides `tag.<k>` and `metadata.<k>`.
SEGMENT_REQUEST_FIELDS = ("model", "user")
_ENGINE_KEYS = {
    "builtin": {"name", "engine", "version", "ref", "batch_window_ms", "max_batch", "dtype"},
    "upstream": {"name", "engine", "version", "url", "upstream_model", "api_key", "timeout", "max_retries"},
}


class ModelSpec(StrictModel):
    """One served policy version. `builtin` decodes in this process; `upstream` forwards to a URL."""

    name: str = Field(pattern=_NAME, description="The name clients send as `model` (or that arms refer to).")
    engine: Literal["builtin", "upstream"] = "builtin"
    version: str | None = Field(
        default=None,
        description="The version label responses report; default: `ref` if it is name@version, else the "
        "checkpoint id (builtin), or upstream_model@url (upstream).",
    )
    ref: str | None = Field(
        default=None, description="builtin: a checkpoint artifact id, `name@version`, or a model folder."
    )
    batch_window_ms: float = Field(
        default=10.0, ge=0.0, le=1000.0, description="builtin: requests arriving within it decode together."
    )
    max_batch: int = Field(default=16, ge=1, le=1024, description="builtin: most requests in one batch.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="builtin weights."
    )
    url: str | None = Field(
        default=None, description="upstream: the server's base URL, e.g. http://h:8000/v1"
    )
    upstream_model: str | None = Field(default=None, description="upstream: the model name it serves.")
    api_key: str | None = Field(default=None, description="upstream: `${ENV:NAME}`, never the key itself.")
    timeout: float = Field(default=60.0, gt=0.0, description="upstream: seconds per request.")
    max_retries: int = Field(default=2, ge=0, le=10, description="upstream: client retries.")

    @model_validator(mode="after")
    def _engine_fields(self) -> ModelSpec:
        if self.engine == "builtin" and not self.ref:
            raise ValueError("a builtin model needs `ref` (checkpoint id, name@version or folder)")
        if self.engine == "upstream" and not (self.url and self.upstream_model):
            raise ValueError("an upstream model needs `url` and `upstream_model`")
        return self


class Arm(StrictModel):
    name: str = Field(pattern=_NAME)
    model: str = Field(description="A model name from `models`.")
    weight: float = Field(default=1.0, gt=0.0, description="Relative share of users (normalised).")


class Segment(StrictModel):
    """Requests whose `field` equals a value (or is in a list) are pinned to `model`, ahead of the arms."""

    field: str = Field(
        description="`tag.<k>` (header X-Alignflow-Tag-<k>), `metadata.<k>`, `model` or `user`."
    )
    equals: str | None = None
    in_: list[str] | None = Field(default=None, alias="in")
    model: str

    model_config = StrictModel.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _one_test(self) -> Segment:
        if (self.equals is None) == (self.in_ is None):
            raise ValueError("a segment needs exactly one of `equals` or `in`")
        prefix, _, key = self.field.partition(".")
        if not ((prefix in ("tag", "metadata") and key) or self.field in SEGMENT_REQUEST_FIELDS):
            raise ValueError(
                f"segment field {self.field!r}: expected tag.<key>, metadata.<key> or one of "
                f"{', '.join(SEGMENT_REQUEST_FIELDS)}"
            )
        return self

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        return value == self.equals if self.equals is not None else value in (self.in_ or [])


class Experiment(StrictModel):
    name: str = Field(pattern=_NAME, description="Clients send this as `model` to enter the experiment.")
    arms: list[Arm] = Field(min_length=1)
    sticky_by: Literal["user"] = Field(
        default="user", description="The request's `user` field, else the X-User-Id header."
    )
    segments: list[Segment] = Field(default_factory=list)


class Limits(StrictModel):
    max_request_bytes: int = Field(default=1_000_000, ge=1, description="Larger bodies get 413.")
    max_tokens: int = Field(default=512, ge=1, description="A request asking for more gets 400.")
    default_max_tokens: int = Field(default=64, ge=1, description="When the request sets no max_tokens.")
    rate_per_minute: int = Field(default=600, ge=1, description="Per key, unless the key sets its own.")

    @model_validator(mode="after")
    def _default_within_limit(self) -> Limits:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens ({self.max_tokens})"
            )
        return self


class LoggingSection(StrictModel):
    enabled: bool = Field(default=False, description="Record requests and responses in the store (opt-in).")
    retention_days: float = Field(default=30.0, gt=0.0, description="`deploy purge-logs` deletes older ones.")


class DeployConfig(StrictModel):
    models: list[ModelSpec] = Field(min_length=1)
    experiments: list[Experiment] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    device: str = Field(default="cpu", description="cpu | cuda | cuda:N, for builtin engines.")

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    def engine_specs(self) -> list[dict[str, Any]]:
        """The model entries for `engine.build_engine`, secrets left as `${ENV:...}` placeholders."""
        out = []
        for spec in to_record(self)["models"]:
            keys = _ENGINE_KEYS[spec["engine"]]
            out.append({k: v for k, v in spec.items() if k in keys and v is not None})
        return out


def reference_errors(cfg: DeployConfig) -> list[tuple[str, str]]:
    """(dotted field, message) for every cross-reference problem: duplicate names, unknown models."""
    errors: list[tuple[str, str]] = []
    models: set[str] = set()
    for i, m in enumerate(cfg.models):
        if m.name in models:
            errors.append((f"models.{i}.name", f"duplicate model name {m.name!r}"))
        models.add(m.name)
    seen: set[str] = set()
    for i, exp in enumerate(cfg.experiments):
        where = f"experiments.{i}"
        if exp.name in seen:
            errors.append((f"{where}.name", f"duplicate experiment name {exp.name!r}"))
        if exp.name in models:
            errors.append(
                (f"{where}.name", f"{exp.name!r} is also a model name; clients could not tell them apart")
            )
        seen.add(exp.name)
        arms: set[str] = set()
        for j, arm in enumerate(exp.arms):
            if arm.name in arms:
                errors.append((f"{where}.arms.{j}.name", f"duplicate arm name {arm.name!r}"))
            arms.add(arm.name)
            if arm.model not in models:
                errors.append((f"{where}.arms.{j}.model", f"unknown model {arm.model!r} (not in `models`)"))
        for j, seg in enumerate(exp.segments):
            if seg.model not in models:
                errors.append(
                    (f"{where}.segments.{j}.model", f"unknown model {seg.model!r} (not in `models`)")
                )
    return errors


def check_references(
    cfg: DeployConfig, source: str = "<config>", lines: dict[str, int] | None = None
) -> None:
    errors = reference_errors(cfg)
    if not errors:
        return
    lines = lines or {}
    msgs = []
    for dotted, msg in errors:
        where = f"{source}:{lines[dotted]}" if dotted in lines else source
        msgs.append(f"{where}: {dotted}: {msg}")
    raise ConfigError("invalid config:\n  " + "\n  ".join(msgs))


def validate_deploy(data: dict[str, Any], source: str = "<config>") -> DeployConfig:
    """Validate a deploy config given as a dict (tests, programmatic use)."""
    cfg = validate_config(data, DeployConfig, source)
    check_references(cfg, source)
    return cfg


def load_deploy_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> DeployConfig:
    """Load `deploy.yaml`; every error names the file, the line and the dotted field."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: deploy config file not found")
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping with at least `models:`")
    data = apply_overrides(data, overrides)
    lines = _yaml_lines(text)
    cfg = validate_config(data, DeployConfig, str(p), lines)
    check_references(cfg, str(p), lines)
    return cfg

"""Typed configs, one pydantic model per stage, loaded from YAML with dotted overrides.

- Unknown keys and type errors fail with the file, the dotted field path and (when the
  value came from the YAML file) its line number.
- `${ENV:NAME}` in any string is replaced by the environment variable NAME at load time.
  The record saved with a run keeps the placeholder, so secrets never reach the store, and
  errors never echo a value that came from the environment: they name the field and the
  variable instead (whether the placeholder was in the file or in an `--override`).
- Defaults live only in the models; `to_record(cfg)` gives the fully resolved config that
  every run saves.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from alignflow.errors import ConfigError

_ENV_RE = re.compile(r"\$\{ENV:([A-Za-z_][A-Za-z0-9_]*)\}")

T = TypeVar("T", bound="StrictModel")


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # dotted path -> original "${ENV:...}" template, so records never hold the secret.
    _env_templates: dict[str, str] = PrivateAttr(default_factory=dict)


# --------------------------------------------------------------------------- sections


class ModelSection(StrictModel):
    path: str = Field(description="Local Hugging Face model directory (never downloaded).")
    tokenizer: str | None = Field(default=None, description="Tokenizer directory; defaults to `path`.")
    dtype: str = Field(default="auto", description="auto | float32 | bfloat16 | float16")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    gradient_checkpointing: bool = False
    attn_implementation: str = Field(default="sdpa", description="sdpa | eager")


class LoraSection(StrictModel):
    enabled: bool = False
    r: int = Field(default=8, gt=0)
    alpha: int = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class DataSection(StrictModel):
    train: str = Field(description="A dataset artifact id or a JSONL/Parquet file (imported on the fly).")
    eval: str | None = Field(
        default=None, description="Held-out dataset; if unset, `eval_fraction` is split off."
    )
    eval_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    max_length: int = Field(
        default=512, gt=0, description="Tokens per example; longer ones are truncated (counted)."
    )
    max_prompt_length: int | None = Field(default=None, gt=0)
    packing: bool = False


class PreferenceDataSection(DataSection):
    """Preference data shared by the reward-model and DPO stages: pairs or k-way rankings."""

    format: Literal["pairs", "rankings"] = Field(
        default="pairs", description="pairs, or k-way rankings expanded to all (better, worse) pairs"
    )
    packing: bool = Field(
        default=True,
        description="Causal backbones: each pair as one packed prefix tree (the prompt once, then chosen and "
        "rejected, which never attend to each other) instead of two padded rows. Same results, fewer token "
        "slots; encoders and models whose head cannot be split off always use padded rows.",
    )


class OptimSection(StrictModel):
    lr: float = Field(default=1e-4, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0.0)
    warmup_steps: int = Field(default=0, ge=0)
    scheduler: str = Field(default="cosine", description="constant | linear | cosine")
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)


class DistributedSection(StrictModel):
    """How `torchrun --nproc-per-node N` (or `alignflow STAGE --nproc N`) splits training; ignored in one process."""

    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="ddp: every rank holds the whole model and optimizer; fsdp: FSDP2 (fully_shard) shards "
        "parameters, gradients and optimizer state across the ranks.",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        default="no",
        description="On CUDA only (bf16 falls back to fp16 where unsupported); CPU runs stay fp32.",
    )
    timeout_minutes: float = Field(
        default=30.0, gt=0.0, description="How long a collective may wait for a slow or dead rank."
    )


class TrainSection(StrictModel):
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    seed: int = 0
    batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    epochs: float = Field(default=1.0, gt=0.0)
    eval_every: int = Field(default=0, ge=0, description="0 = only at the end")
    save_every: int = Field(default=0, ge=0, description="0 = only at the end")
    log_every: int = Field(default=1, gt=0)
    tokens_per_batch: int | Literal["auto"] | None = Field(
        default=None,
        description="Token budget of one micro-batch: a padded batch's rows x its longest example, or a packed "
        "batch's tokens; `batch_size` still caps its rows (RM and DPO count chosen + rejected). None: "
        "batch_size x data.max_length (x2 for pairs). N: at most N tokens (at least one longest example); "
        "grad_accum as configured. auto: the largest budget (whole rows of max_length, at most batch_size "
        "rows) that alignflow.train.memory estimates to fit `memory_limit_gb`, with grad_accum raised so an "
        "optimizer step still sees about batch_size x grad_accum rows. The chosen plan is logged and kept in "
        "summary.json under batch_plan.",
    )
    memory_limit_gb: float | None = Field(
        default=None,
        gt=0.0,
        description="tokens_per_batch: auto only. GiB (2^30 bytes) the run may use for parameters, gradients, "
        "optimizer state and activations. Default: CUDA, 0.9 x the device's total memory; CPU, 0.8 x "
        "MemAvailable (/proc/meminfo) plus what the loaded models already hold, split across local ranks.",
    )

    @field_validator("tokens_per_batch", mode="before")
    @classmethod
    def _budget_value(cls, value: Any) -> Any:
        if value is None or value == "auto":
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        raise ValueError("expected a positive number of tokens, 'auto', or null (batch_size x max_length)")

    @field_validator("memory_limit_gb")
    @classmethod
    def _limit_needs_auto(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("tokens_per_batch") != "auto":
            raise ValueError("applies only with tokens_per_batch: auto")
        return value

    @model_serializer(mode="wrap")
    def _omit_unset_budget(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Unset budget keys are left out, so a config that does not use them records (and hashes) as before."""
        data = handler(self)
        for key in ("tokens_per_batch", "memory_limit_gb"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class CheckpointSection(StrictModel):
    keep_recent_minutes: float = Field(default=60.0, ge=0.0)
    keep_hourly_for_hours: float = Field(default=24.0, ge=0.0)
    keep_daily: bool = True
    best_metric: str | None = Field(
        default=None,
        description="Any logged metric (train, eval/..., heldout/...): a checkpoint is also saved whenever it "
        "improves on the kept best, and `best` in the checkpoints folder names the best so far.",
    )
    best_mode: str = Field(default="min", pattern="^(min|max)$")
    keep_best: int = Field(default=1, ge=1, description="Best checkpoints by best_metric kept by retention.")
    async_save: bool = True


class AlertRule(StrictModel):
    """One live alert rule (`alignflow.monitor.alerts` evaluates it on every logged step)."""

    rule: Literal[
        "kl_spike",
        "kl_ceiling",
        "reward_plateau",
        "entropy_collapse",
        "length_inflation",
        "repetition",
        "ensemble_disagreement",
        "proxy_heldout_divergence",
        "value_loss_explosion",
        "nonfinite",
    ]
    metric: str | None = Field(
        default=None, description="The metric the rule reads; default: the rule's own."
    )
    reference_metric: str | None = Field(
        default=None,
        description="proxy_heldout_divergence: the proxy metric compared with `metric` (the held-out one); "
        "default monitor/proxy_reward.",
    )
    threshold: float | None = Field(default=None, description="Rule-specific; default: the rule's own.")
    window: int | None = Field(default=None, gt=0, description="Steps in the rolling baseline or trend.")
    warmup: int = Field(default=0, ge=0, description="Steps before the rule may fire.")
    cooldown: int = Field(default=10, ge=0, description="Steps between two firings of the rule.")
    severity: Literal["info", "warning", "critical"] = "warning"
    actions: list[Literal["log", "store", "webhook", "stop"]] = Field(
        default_factory=lambda: ["log", "store"]
    )


class AlertsSection(StrictModel):
    enabled: bool = True
    rules: list[AlertRule] | None = Field(default=None, description="None: the stage's default rules.")
    webhook_url: str | None = Field(
        default=None, description="POST target of the webhook action (${ENV:...} ok)."
    )


class MonitorBaseSection(StrictModel):
    """`monitor:` of every stage; the PPO family's section adds its held-out signals."""

    alerts: AlertsSection = Field(default_factory=AlertsSection)


class TrackingSection(StrictModel):
    backends: list[Literal["store", "tensorboard", "mlflow"]] = Field(
        default_factory=lambda: ["store"],
        description="Where metrics go besides the store, which is always written (runs, alerts and pages read it).",
    )
    mlflow_uri: str | None = Field(
        default=None, description="MLflow tracking URI; default sqlite:///<workspace>/mlflow.db."
    )
    mlflow_experiment: str = "alignflow"
    samples_every: int = Field(
        default=0,
        ge=0,
        description="PPO family: a sample table (prompt, response, reward, KL) every N steps.",
    )


class StageConfig(StrictModel):
    """Fields every stage shares."""

    stage: str
    run_name: str | None = None
    output_dir: str | None = Field(default=None, description="Run folder; default <workspace>/runs/<run id>.")
    tags: list[str] = Field(default_factory=list)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    monitor: MonitorBaseSection = Field(default_factory=MonitorBaseSection)


_REGISTRY: dict[str, type[StageConfig]] = {}


def register_stage(name: str):
    """Class decorator: `load_config` picks the model from the YAML's `stage:` key."""

    def deco(cls: type[StageConfig]) -> type[StageConfig]:
        _REGISTRY[name] = cls
        return cls

    return deco


def stage_names() -> list[str]:
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=1e-4` -> (["optim", "lr"], 0.0001). The value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from None
    # YAML 1.1 reads "1e-4" as a string; users mean the number.
    if isinstance(value, str):
        try:
            value = float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value) else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return out


def _interpolate(value: Any, path: str, templates: dict[str, str], source: str) -> Any:
    if isinstance(value, dict):
        return {
            k: _interpolate(v, f"{path}.{k}" if path else str(k), templates, source) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, f"{path}.{i}", templates, source) for i, v in enumerate(value)]
    if isinstance(value, str) and _ENV_RE.search(value):

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                raise ConfigError(
                    f"{source}: {path}: environment variable {name} is not set (from {value!r})"
                )
            return os.environ[name]

        templates[path] = value
        return _ENV_RE.sub(sub, value)
    return value


def _yaml_lines(text: str) -> dict[str, int]:
    """Map each dotted key path in a YAML document to its 1-based line number."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, val in node.value:
                name = f"{prefix}.{key.value}" if prefix else str(key.value)
                lines[name] = key.start_mark.line + 1
                walk(val, name)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                name = f"{prefix}.{i}"
                lines[name] = item.start_mark.line + 1
                walk(item, name)

    if root is not None:
        walk(root, "")
    return lines


def _env_values(templates: dict[str, str]) -> list[str]:
    """The values substituted for `${ENV:...}` placeholders, longest first (so redaction is greedy)."""
    names = {n for t in templates.values() for n in _ENV_RE.findall(t)}
    values = {os.environ[n] for n in names if os.environ.get(n)}
    return sorted(values, key=len, reverse=True)


def _redact(text: str, secrets: Sequence[str], quotes_values: bool) -> str:
    """Replace every substituted value in an error message with `***`.

    Values of 4+ characters go wherever they appear (pydantic's parser errors can quote part of an
    input). A shorter one ("0", "yes") is replaced only as a whole token, and only in a validator's
    own message (`quotes_values`), which may quote what it checked: elsewhere it would turn a bound
    such as "greater than 0" into "greater than ***" without hiding anything.
    """
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "***")
        elif quotes_values:
            text = re.sub(rf"(?<![\w.]){re.escape(secret)}(?![\w.])", "***", text)
    return text


def _env_source(dotted: str, templates: dict[str, str]) -> str | None:
    """The placeholder(s) behind the value at `dotted` (or inside or around it), if any."""
    hits = [
        t
        for path, t in templates.items()
        if path == dotted or path.startswith(f"{dotted}.") or dotted.startswith(f"{path}.")
    ]
    if not hits:
        return None
    return ", ".join(sorted({f"${{ENV:{n}}}" for t in hits for n in _ENV_RE.findall(t)}))


def _format_validation(
    exc: ValidationError,
    source: str,
    lines: dict[str, int],
    templates: dict[str, str] | None = None,
) -> str:
    templates = templates or {}
    secrets = _env_values(templates)
    msgs = []
    for err in exc.errors():
        dotted = ".".join(str(p) for p in err["loc"])
        where = source
        probe = dotted
        while probe and probe not in lines:
            probe = probe.rpartition(".")[0]
        if probe:
            where = f"{source}:{lines[probe]}"
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "required field is missing"
        else:
            msg = err["msg"]
            env = _env_source(dotted, templates)
            if env:
                msg += f" (the value comes from {env} and is not shown)"
            elif "input" in err and not isinstance(err["input"], dict | list):
                msg += f" (got {err['input']!r})"
        msg = _redact(msg, secrets, quotes_values=kind in ("value_error", "assertion_error"))
        msgs.append(f"{where}: {dotted}: {msg}")
    return "invalid config:\n  " + "\n  ".join(msgs)


def validate_config(
    data: dict[str, Any], schema: type[T], source: str = "<config>", lines: dict[str, int] | None = None
) -> T:
    """Interpolate `${ENV:...}` and validate `data` against `schema`, raising ConfigError."""
    templates: dict[str, str] = {}
    resolved = _interpolate(data, "", templates, source)
    try:
        cfg = schema.model_validate(resolved)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source, lines or {}, templates)) from None
    cfg._env_templates = templates
    return cfg


def load_config(
    path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    schema: type[T] | None = None,
) -> T:
    """Load a YAML config, apply `key.sub=value` overrides and validate.

    `schema` defaults to the stage model registered for the file's `stage:` key.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    if schema is None:
        stage = data.get("stage")
        if stage not in _REGISTRY:
            raise ConfigError(
                f"{p}: stage: expected one of {', '.join(stage_names()) or '(none registered)'}, got {stage!r}"
            )
        schema = _REGISTRY[stage]  # type: ignore[assignment]
    return validate_config(data, schema, str(p), _yaml_lines(text))  # type: ignore[arg-type]


def to_record(cfg: StrictModel) -> dict[str, Any]:
    """The resolved config as saved with a run: defaults filled in, secrets left as placeholders."""
    data = cfg.model_dump(mode="json")
    for dotted, template in cfg._env_templates.items():
        node: Any = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = template
        else:
            node[last] = template
    return data

"""Experiment trackers a run's metrics fan out to: TensorBoard event files and MLflow runs.

The store (and `<run_dir>/metrics.jsonl`) is the system of record and always written by the run
helper (`alignflow.recipes.common.Run`); `tracking.backends` adds mirrors of it:

    tracking:
      backends: [store, tensorboard, mlflow]
      mlflow_uri: null            # default sqlite:///<workspace>/mlflow.db; or http://host:5000
      mlflow_experiment: alignflow

- TensorBoard: event files in `<run_dir>/tensorboard/` (scalars per step; the resolved config, sample
  tables and text reports as text summaries). `tensorboard --logdir <workspace>/runs` shows every run.
- MLflow: one MLflow run per alignflow run (tagged `alignflow.run_id`, so a resumed run continues the same
  MLflow run); params are the resolved config flattened to dotted keys, metrics per step, sample tables
  via `log_table`, files via `log_artifact`. With the default SQLite URI the artifacts live in
  `<workspace>/mlruns/` (not the working directory).

Sample tables (prompt, response, reward, KL, ...) are also written to `<run_dir>/samples/step-<N>.jsonl`
whatever the backends (`write_samples` / `read_samples`), which the run pages read.

`tensorboard` and `mlflow` are imported inside the tracker constructors only, so importing this module
(and `alignflow`) stays light when no tracker is configured.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from alignflow.config import TrackingSection
from alignflow.errors import AlignflowError
from alignflow.workspace import Workspace

SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"
RUN_ID_TAG = "alignflow.run_id"
# MLflow's limits (mlflow.utils.validation): a param value up to 6000 characters, 100 params and
# 1000 metrics per log_batch call.
_MLFLOW_PARAM_CHARS = 6000
_MLFLOW_PARAMS_PER_BATCH = 100
_MLFLOW_METRICS_PER_BATCH = 1000
_TB_CELL_CHARS = 400  # a TensorBoard text table stays readable; the full text is in the JSONL file
_TB_TEXT_ARTIFACT_BYTES = 64_000


class TrackerError(AlignflowError):
    """A tracking backend is not installed or cannot be reached; the message names `tracking.*`."""


@runtime_checkable
class Tracker(Protocol):
    """What the run helper calls; every method is cheap enough to call on every step."""

    name: str

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def log_text(self, step: int, tag: str, text: str) -> None: ...

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None: ...

    def log_artifact(self, path: str | Path) -> None: ...

    def close(self, status: str = "finished") -> None: ...


# --------------------------------------------------------------------------------------------- helpers


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys -> strings (lists and None as JSON): MLflow params are flat strings."""
    out: dict[str, str] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, str):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Only finite numbers: trackers reject NaN/inf (the alert rules see them before this filter)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


def write_samples(run_dir: str | Path, step: int, rows: Sequence[Mapping[str, Any]]) -> Path:
    """`<run_dir>/samples/step-<N>.jsonl`, one row per sample; rewritten if the step is logged again."""
    folder = Path(run_dir) / SAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{int(step)}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(dict(r), default=str) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)  # a reader (the run pages) never sees half a table
    return path


def read_samples(run_dir: str | Path) -> dict[int, list[dict[str, Any]]]:
    """Every sample table of a run, by step (ascending)."""
    folder = Path(run_dir) / SAMPLES_DIR
    found: dict[int, list[dict[str, Any]]] = {}
    if not folder.is_dir():
        return found
    for p in folder.glob("step-*.jsonl"):
        m = re.fullmatch(r"step-(\d+)\.jsonl", p.name)
        if m:
            lines = p.read_text(encoding="utf-8").splitlines()
            found[int(m.group(1))] = [json.loads(x) for x in lines if x.strip()]
    return dict(sorted(found.items()))


def markdown_table(rows: Sequence[Mapping[str, Any]], cell_chars: int = _TB_CELL_CHARS) -> str:
    """Rows as a Markdown table (TensorBoard renders text summaries as Markdown)."""
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]

    def cell(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")
        return text if len(text) <= cell_chars else text[: cell_chars - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def default_mlflow_uri(workspace: Workspace) -> str:
    return f"sqlite:///{workspace.home / 'mlflow.db'}"


# --------------------------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker:
    """Event files in `<run_dir>/tensorboard/` through torch's SummaryWriter (tensorboard's own format)."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path, flush_secs: int = 10) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TrackerError(
                f"tracking.backends lists 'tensorboard' but it cannot be imported ({exc}); "
                "install it with: pip install 'alignflow[tracking]'"
            ) from None
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)

    def log_params(self, params: Mapping[str, Any]) -> None:
        # Indented lines are a Markdown code block: the YAML stays aligned in TensorBoard's text tab.
        import yaml

        text = yaml.safe_dump(dict(params), sort_keys=False)
        self._writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self._writer.add_scalar(k, v, step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        self._writer.add_text(tag, text, step)

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        self._writer.add_text(name, markdown_table(rows), step)

    def log_artifact(self, path: str | Path) -> None:
        # Event files hold no files; a small text report (summary.json, a reliability table) is shown as
        # text so it is visible next to the curves. Other files stay in the run folder.
        p = Path(path)
        if p.is_file() and p.stat().st_size <= _TB_TEXT_ARTIFACT_BYTES:
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                return
            self._writer.add_text(f"artifacts/{p.name}", "\n".join("    " + x for x in text.splitlines()), 0)

    def close(self, status: str = "finished") -> None:
        self._writer.flush()
        self._writer.close()


# --------------------------------------------------------------------------------------------- MLflow


class MlflowTracker:
    """One MLflow run per alignflow run, through `MlflowClient` (no global active-run state).

    Metrics are buffered and sent in batches (every `flush_secs` or 1000 values, and before anything else
    is logged or the run ends), so a step costs a dict append rather than a database round trip.
    """

    name = "mlflow"

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_id: str,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        artifact_root: Path | None = None,
        flush_secs: float = 5.0,
    ) -> None:
        try:
            from mlflow.entities import Metric, Param, RunTag
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise TrackerError(
                f"tracking.backends lists 'mlflow' but it cannot be imported ({exc}); "
                "install it with: pip install 'alignflow[tracking]'"
            ) from None
        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.flush_secs = flush_secs
        self._buffer: list[Any] = []
        self._last_flush = time.monotonic()
        try:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = (artifact_root / experiment).as_uri() if artifact_root is not None else None
                exp_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            found = self.client.search_runs(
                [exp_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1
            )
            if found:  # a resumed alignflow run continues its MLflow run
                self.mlflow_run_id = found[0].info.run_id
                self._params = dict(found[0].data.params)
                self.client.update_run(self.mlflow_run_id, status="RUNNING")
            else:
                run = self.client.create_run(
                    exp_id, run_name=run_name or run_id, tags={RUN_ID_TAG: run_id, **dict(tags or {})}
                )
                self.mlflow_run_id = run.info.run_id
                self._params = {}
        except Exception as exc:  # the MLflow client raises many types (HTTP, SQL, MlflowException)
            raise TrackerError(
                f"tracking.mlflow_uri {uri!r}: cannot open experiment {experiment!r}: {exc}"
            ) from None

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {_mlflow_key(k): v[:_MLFLOW_PARAM_CHARS] for k, v in flatten(params).items()}
        # MLflow params are immutable: a resumed run logs only keys it does not have yet; a changed value
        # (an override on resume) is kept as a tag so the difference is visible rather than an error.
        new = [self._Param(k, v) for k, v in flat.items() if k not in self._params]
        changed = [
            self._RunTag(f"alignflow.resumed_param.{k}"[:250], v)
            for k, v in flat.items()
            if k in self._params and self._params[k] != v
        ]
        for i in range(0, len(new), _MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.mlflow_run_id, params=new[i : i + _MLFLOW_PARAMS_PER_BATCH])
        if changed:
            self.client.log_batch(self.mlflow_run_id, tags=changed[:_MLFLOW_PARAMS_PER_BATCH])
        self._params.update(flat)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self._buffer += [self._Metric(_mlflow_key(k), float(v), now, int(step)) for k, v in metrics.items()]
        if (
            len(self._buffer) >= _MLFLOW_METRICS_PER_BATCH
            or time.monotonic() - self._last_flush >= self.flush_secs
        ):
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = (
                self._buffer[:_MLFLOW_METRICS_PER_BATCH],
                self._buffer[_MLFLOW_METRICS_PER_BATCH:],
            )
            self.client.log_batch(self.mlflow_run_id, metrics=chunk)
        self._last_flush = time.monotonic()

    def log_text(self, step: int, tag: str, text: str) -> None:
        self.flush()
        self.client.log_text(self.mlflow_run_id, text, f"text/{_mlflow_key(tag)}/step-{int(step)}.txt")

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        self.flush()
        columns: list[str] = []
        for r in rows:
            columns += [c for c in r if c not in columns]
        data = {c: [_plain(r.get(c)) for r in rows] for c in columns}
        path = f"{_mlflow_key(name)}/step-{int(step)}.json"
        try:
            # log_table registers the file as a table, so the MLflow UI's evaluation view can show it
            self.client.log_table(self.mlflow_run_id, data, path)
        except ImportError:  # log_table needs pandas; the same columns as a plain JSON artifact
            self.client.log_dict(self.mlflow_run_id, {"columns": columns, "data": data}, path)

    def log_artifact(self, path: str | Path) -> None:
        self.flush()
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.mlflow_run_id, str(p), artifact_path=p.name)
        elif p.is_file():
            self.client.log_artifact(self.mlflow_run_id, str(p))

    def close(self, status: str = "finished") -> None:
        self.flush()
        mlflow_status = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}.get(
            status, "FINISHED"
        )
        self.client.set_terminated(self.mlflow_run_id, status=mlflow_status)


def _mlflow_key(name: str) -> str:
    # MLflow keys allow letters, digits, '_', '-', '.', ' ', ':', '/' (mlflow.utils.validation); a round
    # stage's '@' (ppo@2) becomes '_'
    return re.sub(r"[^\w\-. :/]", "_", name)[:250]


def _plain(v: Any) -> Any:
    return v if v is None or isinstance(v, str | int | float | bool) else json.dumps(v, default=str)


# --------------------------------------------------------------------------------------------- factory


def build_trackers(
    section: TrackingSection,
    run_dir: str | Path,
    run_id: str,
    config_record: Mapping[str, Any],
    *,
    workspace: Workspace | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> list[Tracker]:
    """The trackers `tracking.backends` asks for beyond the store, each with the params already logged.

    `workspace` gives the default MLflow URI (`sqlite:///<workspace>/mlflow.db`) and artifact root
    (`<workspace>/mlruns`); without it the environment's workspace (`ALIGNFLOW_HOME`) is used.
    """
    trackers: list[Tracker] = []
    try:
        if "tensorboard" in section.backends:
            trackers.append(TensorBoardTracker(Path(run_dir) / TENSORBOARD_DIR))
        if "mlflow" in section.backends:
            ws = workspace or Workspace.from_env()
            uri = section.mlflow_uri or default_mlflow_uri(ws)
            local = uri.startswith("sqlite:") and section.mlflow_uri is None
            if local:
                ws.home.mkdir(parents=True, exist_ok=True)
            trackers.append(
                MlflowTracker(
                    uri,
                    section.mlflow_experiment,
                    run_id,
                    run_name=run_name,
                    tags=tags,
                    artifact_root=ws.home / "mlruns" if local else None,
                )
            )
        for t in trackers:
            t.log_params(config_record)
    except BaseException:
        for t in trackers:  # do not leave a half-opened MLflow run RUNNING or a writer thread alive
            try:
                t.close("failed")
            except Exception:  # noqa: BLE001 - already failing; the first error is the one to report
                pass
        raise
    return trackers

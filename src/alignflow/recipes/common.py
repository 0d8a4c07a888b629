"""What every recipe shares: the run (folder, store record, metrics, trackers, alerts), graceful stop, NaN guard.

A recipe reads top to bottom:

    run = start_run(cfg)                        # run folder, store row, resolved config saved
    ...setup model, data, optimizer...
    ckpt = run.checkpoints()                    # CheckpointManager in <run_dir>/checkpoints
    resumed = ckpt.load_latest()                # continue where a stopped run left off
    with ckpt, run.stopper() as stop, run.progress(total) as bar:
        for step in ...:
            ...
            check_finite(loss, step, batch_ids, ckpt)
            run.log(step, metrics, texts=None); bar.update(step, metrics)  # store, trackers, alert rules
            if run.end_step(ckpt, stop, step, total, ...):  # the one save path: periodic, stop, final
                return {"stopped": True, ...}
    run.finish(summary, outputs)                # artifacts registered with lineage edges

The run folder is `<workspace>/runs/<run id>` or `output_dir`; re-running with the same
`output_dir` resumes the same run id and its checkpoints.

Every logged step goes to the store and `metrics.jsonl` (the system of record), then to the trackers
`tracking.backends` names (`alignflow.monitor.trackers`: TensorBoard, MLflow; params = the resolved
config), then to the alert rules of `monitor.alerts` (`alignflow.monitor.alerts`). An alert whose
actions include `stop` ends the run at the end of that step like Ctrl-C does: a synchronous checkpoint,
status `stopped`, and the store's summary names the alert. At `finish` the summary and the run's
reports are logged to the trackers as artifacts. A tracker that fails mid-run is turned off with a
warning rather than ending the training.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from alignflow.config import StageConfig, to_record
from alignflow.data.io import resolve_dataset
from alignflow.errors import AlignflowError
from alignflow.monitor.trackers import Tracker, build_trackers, finite_metrics, write_samples
from alignflow.store import Store
from alignflow.train.distributed import DistContext
from alignflow.workspace import Workspace

console = Console(stderr=True, soft_wrap=True)
RUN_FILE = "run.json"
ALERT_STATE_DIR = "alert-state"  # the alert monitor's state at each checkpointed step, for an exact resume
# Files in the run folder logged to the trackers as reports at `finish` (besides summary.json and config.yaml).
REPORT_SUFFIXES = (".json", ".md", ".html", ".csv", ".txt")


class NonFiniteLossError(AlignflowError):
    """The loss became NaN or infinite; the message names the step, the examples and the last good checkpoint."""


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class StopFlag:
    requested: bool = False
    signal_name: str | None = None


@dataclass
class Run:
    """One execution of a stage: its folder, its row in the store, its metrics file."""

    store: Store
    run_id: str
    run_dir: Path
    stage: str
    config: dict[str, Any]
    resumed: bool
    config_artifact: str
    inputs: list[tuple[str, str]] = field(default_factory=list)  # (artifact id, role)
    trackers: list[Tracker] = field(default_factory=list)
    alerts: Any = None  # alignflow.monitor.alerts.AlertMonitor when monitor.alerts is enabled
    stopped_by: Any = None  # the Alert with the `stop` action that ended the run, if any
    # Under torchrun: only rank 0 (dist.is_main) writes to the store, the run folder's files, the trackers
    # and the console; the other ranks get artifact ids from it by broadcast.
    dist: DistContext = field(default_factory=DistContext)
    stop_signal: str | None = None  # the signal that stopped the run (SIGTERM/SIGUSR1: exit EXIT_REQUEUE)
    _metrics_file: Any = None
    _alert_state_checked: bool = False

    # -- inputs --------------------------------------------------------------------------------------

    def dataset(self, ref: str, kind: str, role: str = "dataset") -> str:
        """Resolve a dataset artifact id/name or import a file on the fly; records it as an input."""
        aid = self.dist.broadcast(resolve_dataset(self.store, ref, kind) if self.dist.is_main else None)
        self.add_input(aid, role)
        return aid

    def model_dir(self, path: str, role: str = "base_model") -> str:
        """Register a model directory (a base model or an earlier checkpoint) as an input artifact.

        A folder whose content is already stored (e.g. an earlier stage's checkpoint, wherever it
        lies) links to that artifact, and so to its lineage; otherwise it is stored once as a model.
        """
        p = Path(path).resolve()
        aid = None
        if self.dist.is_main:
            aid = self.store.lookup_directory(p) or self.store.put_directory(p, kind="model", name=p.name)
        aid = self.dist.broadcast(aid)
        self.add_input(aid, role)
        return aid

    def add_input(self, artifact_id: str, role: str) -> None:
        if (artifact_id, role) not in self.inputs:
            self.inputs.append((artifact_id, role))

    # -- outputs -------------------------------------------------------------------------------------

    def register_checkpoint(
        self, path: str | os.PathLike[str], name: str | None = None, meta: Mapping[str, Any] | None = None
    ) -> str:
        """Store a Hugging Face-format folder as a `checkpoint` artifact with edges to all inputs."""
        aid = None
        if self.dist.is_main:
            aid = self.store.put_directory(
                path,
                kind="checkpoint",
                name=name or f"{self.stage}-{self.run_id}",
                meta={"stage": self.stage, **dict(meta or {})},
                parents=[*self.inputs, (self.config_artifact, "config")],
                run_id=self.run_id,
            )
        return self.dist.broadcast(aid)

    def register_dataset(self, rows: Any, kind: str, name: str, meta: Mapping[str, Any] | None = None) -> str:
        aid = None
        if self.dist.is_main:
            aid = self.store.put_dataset(
                rows,
                kind=kind,
                name=name,
                meta=meta,
                parents=[*self.inputs, (self.config_artifact, "config")],
                run_id=self.run_id,
            )
        return self.dist.broadcast(aid)

    # -- metrics and progress --------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, float], texts: Sequence[str] | None = None) -> None:
        """Metrics go to the store and `<run_dir>/metrics.jsonl` (readable while the run is live), then to
        the trackers, then to the alert rules (`texts`: this step's sampled responses, for the repetition rule).
        """
        if not self.dist.is_main:
            return
        clean = finite_metrics({k: v for k, v in metrics.items() if v is not None})
        self.store.log_metrics(self.run_id, step, clean)
        if self._metrics_file is None:
            self._metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._metrics_file.write(json.dumps({"step": step, **clean}) + "\n")
        self._metrics_file.flush()
        self._each_tracker("log_metrics", step, clean)
        if self.alerts is not None:
            self._restore_alert_state(step)
            # the rules see NaN/inf too: the nonfinite rule exists for exactly those values
            raw = {k: float(v) for k, v in metrics.items() if v is not None}
            for alert in self.alerts.observe(step, raw, texts):
                self._each_tracker(
                    "log_text", step, "alerts", f"[{alert.severity}] {alert.rule}: {alert.message}"
                )
            if self.stopped_by is None:
                self.stopped_by = self.alerts.stop_alert  # the first alert with the `stop` action

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> Path:
        """A sample table (prompt, response, reward, KL, ...): `<run_dir>/samples/step-<N>.jsonl` + trackers."""
        if not self.dist.is_main:
            return self.run_dir / "samples" / f"step-{step}.jsonl"
        path = write_samples(self.run_dir, step, rows)
        self._each_tracker("log_table", step, "samples", [dict(r) for r in rows])
        return path

    def log_artifact(self, path: str | os.PathLike[str]) -> None:
        """A file or folder of the run (a report, a plot) sent to the trackers (the store keeps run files
        through `register_*`)."""
        self._each_tracker("log_artifact", Path(path))

    def _each_tracker(self, method: str, *args: Any) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception as exc:  # noqa: BLE001 - any backend error: keep training, stop mirroring
                self.trackers.remove(t)
                console.print(
                    f"[yellow]tracker {t.name} failed ({type(exc).__name__}: {exc}); it is turned off for "
                    f"the rest of run {self.run_id}[/] (the store still has every metric)"
                )

    def _save_alert_state(self, step: int) -> None:
        if self.alerts is None or not self.dist.is_main:
            return
        folder = self.run_dir / ALERT_STATE_DIR
        folder.mkdir(exist_ok=True)
        tmp = folder / f".step-{step}.json.tmp"
        tmp.write_text(json.dumps(self.alerts.state_dict()))
        tmp.replace(folder / f"step-{step}.json")
        for old in sorted(folder.glob("step-*.json"), key=_state_step)[:-3]:  # a few, as checkpoint pruning
            old.unlink(missing_ok=True)

    def _restore_alert_state(self, step: int) -> None:
        """On the first step of a resumed run: the monitor's windows and cool-downs as of the checkpoint."""
        if self._alert_state_checked:
            return
        self._alert_state_checked = True
        if not self.resumed:
            return
        saved = [p for p in (self.run_dir / ALERT_STATE_DIR).glob("step-*.json") if _state_step(p) < step]
        if saved:
            self.alerts.load_state_dict(json.loads(max(saved, key=_state_step).read_text()))

    @contextmanager
    def progress(
        self, total: int, keys: Sequence[str] = ("loss",), completed: int = 0
    ) -> Iterator[ProgressBar]:
        bar = ProgressBar(total, keys, completed, description=self.stage, disable=not self.dist.is_main)
        with bar:
            yield bar

    # -- lifecycle -----------------------------------------------------------------------------------

    @contextmanager
    def stopper(self) -> Iterator[StopFlag]:
        """SIGINT, SIGTERM and SIGUSR1 set a flag instead of killing: the recipe checkpoints at the end of the
        current step and exits cleanly. SIGTERM and SIGUSR1 (Slurm's warning before a preemption) mean
        "requeue me": the CLI then exits with EXIT_REQUEUE (75) instead of 0. Under torchrun the ranks agree
        on the step in ``end_step``, so a signal that reached one rank stops them all at the same step."""
        flag = StopFlag()

        def handler(signum: int, _frame: Any) -> None:
            if flag.requested:
                if signum == signal.SIGINT:  # a second Ctrl-C means "now"
                    raise KeyboardInterrupt
                return  # a repeated preemption warning (Slurm signals every process of the step) changes nothing
            flag.requested = True
            flag.signal_name = signal.Signals(signum).name

        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
        for s in old:
            signal.signal(s, handler)
        try:
            yield flag
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def checkpoints(self, retention: Any = None):  # noqa: ANN201 - avoid importing torch-heavy types at module level
        from alignflow.train.checkpoint import CheckpointManager

        return CheckpointManager(self.run_dir / "checkpoints", retention=retention, dist=self.dist)

    def end_step(
        self,
        ckpt: Any,
        stop: StopFlag,
        step: int,
        total: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        data_state: Any,
        metrics: Mapping[str, float],
        save_every: int,
        async_save: bool,
    ) -> bool:
        """Checkpoint when due (or when a stop was requested); True means the recipe must return now.

        On a stop (a signal, or an alert with the `stop` action) the checkpoint is written synchronously,
        so "exit 0" means "resumable". The last step is also written synchronously: the final export
        reads the same weights.
        """
        requested = stop.requested or self.stopped_by is not None
        if self.dist.enabled:  # one collective per step: every rank stops at this step, or none does
            requested = self.dist.any(requested)
            if requested:
                names = [n for n in self.dist.gather(stop.signal_name) if n]
                stop.requested = True
                stop.signal_name = stop.signal_name or (names[0] if names else None)
        if requested:
            ckpt.save(step, model, optimizer, scheduler, data_state, self.config, metrics, blocking=True)
            self._save_alert_state(step)
            self.stop(step, stop.signal_name if stop.requested else None)
            return True
        if step == total or (save_every and step % save_every == 0):
            blocking = step == total or not async_save
            ckpt.save(step, model, optimizer, scheduler, data_state, self.config, metrics, blocking=blocking)
            self._save_alert_state(step)
        return False

    def stop(self, step: int, signal_name: str | None) -> None:
        summary: dict[str, Any] = {"stopped_at_step": step}
        if signal_name is None and self.stopped_by is not None:
            a = self.stopped_by
            summary["stopped_by"] = f"alert:{a.rule}"
            summary["alert"] = {
                "rule": a.rule,
                "severity": a.severity,
                "step": a.step,
                "metric": a.metric,
                "value": a.value,
                "threshold": a.threshold,
                "message": a.message,
            }
            reason = f"alert {a.rule} ({a.message})"
        else:
            summary["stopped_by"] = f"signal:{signal_name}" if signal_name else "stop"
            reason = f"{signal_name or 'stop'} received"
        self.stop_signal = signal_name
        if not self.dist.is_main:
            self._close("stopped")
            return
        self.store.finish_run(self.run_id, status="stopped", summary=summary)
        self._each_tracker("log_text", step, "stopped", json.dumps(summary, default=str))
        self._close("stopped")
        console.print(
            f"[yellow]{reason}: checkpoint saved at step {step}.[/] "
            f"Resume with the same command (run folder {self.run_dir})."
        )

    def finish(self, summary: Mapping[str, Any], outputs: Mapping[str, str] | None = None) -> None:
        if not self.dist.is_main:
            self._close("finished")
            return
        (self.run_dir / "summary.json").write_text(
            json.dumps({**summary, "outputs": dict(outputs or {})}, indent=1)
        )
        self.store.finish_run(
            self.run_id, status="finished", summary={**summary, "outputs": dict(outputs or {})}
        )
        for path in self.report_files():
            self.log_artifact(path)
        self._close("finished")

    def report_files(self) -> list[Path]:
        """What `finish` logs to the trackers: the summary, the resolved config and the run's reports."""
        first = [self.run_dir / "summary.json", self.run_dir / "config.yaml"]
        reports = sorted(
            p
            for p in self.run_dir.iterdir()
            if p.is_file() and p.suffix in REPORT_SUFFIXES and p.name not in ("summary.json", RUN_FILE)
        )
        return [p for p in first if p.is_file()] + reports

    def fail(self, exc: BaseException) -> None:
        if not self.dist.is_main:
            self._close("failed")
            return
        self.store.finish_run(self.run_id, status="failed", summary={"error": str(exc)[:2000]})
        self._each_tracker("log_text", 0, "error", f"{type(exc).__name__}: {str(exc)[:2000]}")
        self._close("failed")

    def _close(self, status: str = "finished") -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            try:
                t.close(status)
            except Exception as exc:  # noqa: BLE001 - the run's own outcome stands; say the mirror is incomplete
                console.print(f"[yellow]tracker {t.name} could not be closed: {exc}[/]")


def _state_step(path: Path) -> int:
    return int(path.stem.split("-", 1)[1])


def check_world(cfg: StageConfig, dist: DistContext) -> None:
    """What a job of ``dist.world_size`` processes needs of a config with ``train.grad_accum`` (SFT, DPO; the
    reward recipe adds its own rule): `--nproc N` checks it before torchrun starts, each process again at the
    start of the recipe's ``run``."""
    dist.check_split(cfg.train.grad_accum)  # type: ignore[attr-defined]


def start_run(cfg: StageConfig, store: Store | None = None, dist: DistContext | None = None) -> Run:
    """Create (or resume, when its folder already holds a run) the run for a stage config.

    Under torchrun (``dist.enabled``) rank 0 creates the run and the others join it: they read the store
    but never write to it, and keep no trackers or alert monitor.
    """
    dist = dist or DistContext()
    if dist.enabled and not dist.is_main:
        joined = dist.broadcast(None)  # rank 0's run, once it exists (or its error, and we stop too)
        if isinstance(joined, str):
            raise AlignflowError(f"rank 0 could not start the run: {joined}")
        store = store or Store.open(Workspace.from_env())
        return Run(store=store, dist=dist, **joined)
    try:
        run = _start_main_run(cfg, store)
    except BaseException as exc:
        if dist.enabled:
            dist.broadcast(f"{type(exc).__name__}: {exc}")
        raise
    run.dist = dist
    if dist.enabled:
        dist.broadcast(
            {
                "run_id": run.run_id,
                "run_dir": run.run_dir,
                "stage": run.stage,
                "config": run.config,
                "resumed": run.resumed,
                "config_artifact": run.config_artifact,
            }
        )
    return run


def _start_main_run(cfg: StageConfig, store: Store | None) -> Run:
    store = store or Store.open(Workspace.from_env())
    record = to_record(cfg)
    if cfg.output_dir:
        run_dir = Path(cfg.output_dir).resolve()
    else:
        run_dir = None
    previous = (
        json.loads((run_dir / RUN_FILE).read_text()) if run_dir and (run_dir / RUN_FILE).is_file() else None
    )
    run_id = store.start_run(
        cfg.stage,
        config=record,
        name=cfg.run_name,
        run_dir=run_dir,
        run_id=previous["run_id"] if previous else None,
    )
    if run_dir is None:
        run_dir = store.workspace.runs_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    if not previous:
        (run_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id, "stage": cfg.stage}))
    config_artifact = store.put_json(record, kind="config", name=f"{cfg.stage}-config")
    run = Run(
        store=store,
        run_id=run_id,
        run_dir=run_dir,
        stage=cfg.stage,
        config=record,
        resumed=previous is not None,
        config_artifact=config_artifact,
    )
    try:
        run.trackers = build_trackers(
            cfg.tracking,
            run_dir,
            run_id,
            record,
            workspace=store.workspace,
            run_name=cfg.run_name,
            tags={"alignflow.stage": cfg.stage},
        )
        if cfg.monitor.alerts.enabled:
            run.alerts = _alert_monitor(cfg, store, run_id)
    except BaseException as exc:  # the store's row would otherwise stay `running` forever
        run.fail(exc)
        raise
    return run


def _alert_monitor(cfg: StageConfig, store: Store, run_id: str) -> Any:
    # imported here: alerts pulls in nothing heavy, but the monitor is only needed when alerts are on
    from alignflow.monitor.alerts import AlertMonitor, default_rules

    return AlertMonitor(cfg.monitor.alerts, default_rules(cfg.stage), store=store, run_id=run_id)


def check_finite(loss: torch.Tensor, step: int, example_ids: Iterable[Any], checkpoints: Any = None) -> None:
    """Stop with a useful message on a NaN/inf loss rather than training on garbage."""
    if torch.isfinite(loss).all():
        return
    ids = list(example_ids)
    shown = ", ".join(map(str, ids[:20])) + (f" ... ({len(ids)} in all)" if len(ids) > 20 else "")
    last = None
    if checkpoints is not None:
        found = checkpoints.checkpoints()
        last = str(found[-1]) if found else None
    raise NonFiniteLossError(
        f"loss is {loss.item()} at step {step}; batch example ids: [{shown}]; "
        f"last good checkpoint: {last or 'none saved yet'}"
    )


class ProgressBar:
    """A rich progress bar showing the key metrics; silent when stderr is not a terminal and CI is set."""

    def __init__(
        self,
        total: int,
        keys: Sequence[str],
        completed: int = 0,
        description: str = "train",
        disable: bool = False,
    ) -> None:
        self.keys = list(keys)
        disable = disable or (not sys.stderr.isatty() and os.environ.get("CI") == "true")
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
            disable=disable,
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total, completed=completed, metrics="")

    def __enter__(self) -> ProgressBar:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)  # type: ignore[arg-type]

    def update(self, completed: int, metrics: Mapping[str, float] | None = None) -> None:
        text = "  ".join(f"{k}={metrics[k]:.4g}" for k in self.keys if metrics and k in metrics)
        self._progress.update(self._task, completed=completed, metrics=text)

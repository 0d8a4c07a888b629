"""What every recipe shares: the run (folder, store record, metrics), graceful stop, NaN guard.

A recipe reads top to bottom:

    run = start_run(cfg)                        # run folder, store row, resolved config saved
    ...setup model, data, optimizer...
    ckpt = run.checkpoints()                    # CheckpointManager in <run_dir>/checkpoints
    resumed = ckpt.load_latest()                # continue where a stopped run left off
    with ckpt, run.stopper() as stop, run.progress(total) as bar:
        for step in ...:
            ...
            check_finite(loss, step, batch_ids, ckpt)
            run.log(step, metrics); bar.update(step, metrics)
            if run.end_step(ckpt, stop, step, total, ...):  # the one save path: periodic, stop, final
                return {"stopped": True, ...}
    run.finish(summary, outputs)                # artifacts registered with lineage edges

The run folder is `<workspace>/runs/<run id>` or `output_dir`; re-running with the same
`output_dir` resumes the same run id and its checkpoints.
"""

from __future__ import annotations

import json
import math
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
from alignflow.store import Store
from alignflow.workspace import Workspace

console = Console(stderr=True, soft_wrap=True)
RUN_FILE = "run.json"


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
    _metrics_file: Any = None

    # -- inputs --------------------------------------------------------------------------------------

    def dataset(self, ref: str, kind: str, role: str = "dataset") -> str:
        """Resolve a dataset artifact id/name or import a file on the fly; records it as an input."""
        aid = resolve_dataset(self.store, ref, kind)
        self.add_input(aid, role)
        return aid

    def model_dir(self, path: str, role: str = "base_model") -> str:
        """Register a model directory (a base model or an earlier checkpoint) as an input artifact.

        A folder whose content is already stored (e.g. an earlier stage's checkpoint, wherever it
        lies) links to that artifact, and so to its lineage; otherwise it is stored once as a model.
        """
        p = Path(path).resolve()
        aid = self.store.lookup_directory(p) or self.store.put_directory(p, kind="model", name=p.name)
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
        return self.store.put_directory(
            path,
            kind="checkpoint",
            name=name or f"{self.stage}-{self.run_id}",
            meta={"stage": self.stage, **dict(meta or {})},
            parents=[*self.inputs, (self.config_artifact, "config")],
            run_id=self.run_id,
        )

    def register_dataset(self, rows: Any, kind: str, name: str, meta: Mapping[str, Any] | None = None) -> str:
        return self.store.put_dataset(
            rows,
            kind=kind,
            name=name,
            meta=meta,
            parents=[*self.inputs, (self.config_artifact, "config")],
            run_id=self.run_id,
        )

    # -- metrics and progress --------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Metrics go to the store and to `<run_dir>/metrics.jsonl` (readable while the run is live)."""
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        self.store.log_metrics(self.run_id, step, clean)
        if self._metrics_file is None:
            self._metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._metrics_file.write(json.dumps({"step": step, **clean}) + "\n")
        self._metrics_file.flush()

    @contextmanager
    def progress(
        self, total: int, keys: Sequence[str] = ("loss",), completed: int = 0
    ) -> Iterator[ProgressBar]:
        bar = ProgressBar(total, keys, completed, description=self.stage)
        with bar:
            yield bar

    # -- lifecycle -----------------------------------------------------------------------------------

    @contextmanager
    def stopper(self) -> Iterator[StopFlag]:
        """SIGINT/SIGTERM set a flag instead of killing: the recipe checkpoints and exits cleanly."""
        flag = StopFlag()

        def handler(signum: int, _frame: Any) -> None:
            if flag.requested:  # a second Ctrl-C means "now"
                raise KeyboardInterrupt
            flag.requested = True
            flag.signal_name = signal.Signals(signum).name

        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, handler)
        try:
            yield flag
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def checkpoints(self, retention: Any = None):  # noqa: ANN201 - avoid importing torch-heavy types at module level
        from alignflow.train.checkpoint import CheckpointManager

        return CheckpointManager(self.run_dir / "checkpoints", retention=retention)

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

        On a stop the checkpoint is written synchronously, so "exit 0" means "resumable". The last
        step is also written synchronously: the final export reads the same weights.
        """
        if stop.requested:
            ckpt.save(step, model, optimizer, scheduler, data_state, self.config, metrics, blocking=True)
            self.stop(step, stop.signal_name)
            return True
        if step == total or (save_every and step % save_every == 0):
            blocking = step == total or not async_save
            ckpt.save(step, model, optimizer, scheduler, data_state, self.config, metrics, blocking=blocking)
        return False

    def stop(self, step: int, signal_name: str | None) -> None:
        self.store.finish_run(self.run_id, status="stopped", summary={"stopped_at_step": step})
        self._close()
        console.print(
            f"[yellow]{signal_name or 'stop'} received: checkpoint saved at step {step}.[/] "
            f"Resume with the same command (run folder {self.run_dir})."
        )

    def finish(self, summary: Mapping[str, Any], outputs: Mapping[str, str] | None = None) -> None:
        (self.run_dir / "summary.json").write_text(
            json.dumps({**summary, "outputs": dict(outputs or {})}, indent=1)
        )
        self.store.finish_run(
            self.run_id, status="finished", summary={**summary, "outputs": dict(outputs or {})}
        )
        self._close()

    def fail(self, exc: BaseException) -> None:
        self.store.finish_run(self.run_id, status="failed", summary={"error": str(exc)[:2000]})
        self._close()

    def _close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None


def start_run(cfg: StageConfig, store: Store | None = None) -> Run:
    """Create (or resume, when its folder already holds a run) the run for a stage config."""
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
    return Run(
        store=store,
        run_id=run_id,
        run_dir=run_dir,
        stage=cfg.stage,
        config=record,
        resumed=previous is not None,
        config_artifact=config_artifact,
    )


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
        self, total: int, keys: Sequence[str], completed: int = 0, description: str = "train"
    ) -> None:
        self.keys = list(keys)
        disable = not sys.stderr.isatty() and os.environ.get("CI") == "true"
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

"""`alignflow run PIPELINE --engine ray`: each stage of a pipeline runs as one Ray task.

The DAG runner (`alignflow.pipeline.runner`) stays the scheduler: it computes the stage keys, skips
unchanged stages, writes state.json and resumes a failed stage from its work folder exactly as with the
local engine. Only the execution of a stage moves: `RayEngine.run` submits `_stage_task` with
`ray.remote(num_cpus=..., num_gpus=...)` and waits for its output dict. Stages still run one after another
in the DAG's order.

What the task gets and does:

- Its own `Store`, opened on the driver's workspace (home folder and database URL). The workspace must be
  the same path on every node that runs stages (a shared filesystem; a local instance always is).
- The driver's environment for the names in `FORWARDED_ENV` (`ALIGNFLOW_*`, `HF_*`, `TRANSFORMERS_*`, ...),
  set for the duration of the task, and the driver's own `sys.path` entries (a checkout's `src/`, the
  folder of a stage module), so `call: tests.pipeline.stages:train` imports in the worker as it does here.
- The driver's torch thread count. Ray starts workers with OMP_NUM_THREADS=1; the task calls
  `torch.set_num_threads(n)` with the driver's `torch.get_num_threads()` (and sets OMP_NUM_THREADS/
  MKL_NUM_THREADS to n for subprocesses), so float results, and with them content hashes, equal the
  local engine's.
- Priority: the local instance runs its workers at nice 0 (`worker_niceness`; Ray's default is 15, which
  on a machine shared with other jobs made stages several times slower than the local engine). A worker of
  an existing cluster keeps the cluster's setting; the task log says when it runs niced
  (start the cluster with RAY_worker_niceness=0 to change it).
- Logs: the task's stdout and stderr (file descriptors 1 and 2, so subprocesses and C libraries are
  included) go to `<work_dir>/ray-task.log`, appended to across attempts. The driver follows that file
  while it waits and prints each new line through its `log` (the CLI's console), so the output of a stage,
  its `ctx.log` lines included, appears as it is written, as under the local engine. Ray's own worker log
  streaming is off (`log_to_driver=False`).
- `resources: {nproc: N}` on an sft/rm/dpo stage: the task writes the validated stage config to
  `<work_dir>/stage-config.yaml` and runs `python -m torch.distributed.run --standalone --nproc-per-node N
  -m alignflow.cli.main <recipe> stage-config.yaml --result-json <work_dir>/stage-result.json`; the result
  file (rank 0's return of the recipe's `run`, or the error it raised) is the stage's output.

Errors: a stage that raises in the task raises the same exception on the driver (the cause of Ray's
`RayTaskError`, with the worker's traceback as a note when it is not an `AlignflowError`), so the CLI prints
the same one line as with the local engine and state.json marks the stage failed; the next run resumes it. A
worker that dies (killed, out of memory) becomes a PipelineError naming the stage and its log. Tasks are not
retried by Ray (`max_retries=0`): the re-run of the pipeline is the retry, and it resumes.

Ray is imported here only inside functions: `import alignflow.pipeline` never imports it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from alignflow.errors import AlignflowError
from alignflow.pipeline.runner import (
    PipelineError,
    StageContext,
    StageSpec,
    check_result,
    recipe_config,
    run_call,
)
from alignflow.store import Store
from alignflow.workspace import Workspace

INSTALL_HINT = "pip install 'alignflow[ray]'"
LOG_NAME = "ray-task.log"
CONFIG_NAME = "stage-config.yaml"
RESULT_NAME = "stage-result.json"
FORWARDED_PREFIXES = ("ALIGNFLOW_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "OPENAI_", "MLFLOW_", "AF_")
FORWARDED_NAMES = ("PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG", "HUGGINGFACE_HUB_CACHE")
CLI_COMMANDS = {"sft": "sft", "rm": "rm", "reward": "rm", "dpo": "dpo"}
POLL_S = 0.5


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise PipelineError(f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's variables a stage task sees (FORWARDED_PREFIXES, FORWARDED_NAMES)."""
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in environ.items() if k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES}


def _own_sys_path() -> list[str]:
    """The driver's sys.path entries that are not the interpreter's (a checkout, a stage module's folder)."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    out = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if not os.path.isdir(path) or any(path == p or path.startswith(p + os.sep) for p in prefixes):
            continue
        if path not in out:
            out.append(path)
    return out


class RayEngine:
    """Runs each stage as a Ray task (see the module docstring); `close()` shuts down what it started."""

    name = "ray"

    def __init__(self, store: Store, log: Callable[[str], None], address: str | None = None) -> None:
        self.ray = import_ray()
        self.store = store
        self.log = log
        self.address = address
        self.started = False  # we started the instance, so we shut it down
        self.init_seconds: float | None = None
        self._threads: int | None = None
        self._remote: Any = None  # ray.remote(_stage_task), made once

    # ------------------------------------------------------------------------------------------- cluster

    def prepare(self) -> None:
        """Start (or join) Ray: called by the runner before the first stage that runs, so skips never pay."""
        ray = self.ray
        if ray.is_initialized():
            return  # someone else's instance (a test fixture, a notebook): use it, leave it running
        t0 = time.perf_counter()
        try:
            if self.address is None:
                ncpu = os.cpu_count() or 1
                ray.init(
                    num_cpus=ncpu,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    # Ray starts workers at nice 15: beside any other job on the machine a stage then gets a
                    # fraction of the CPU the local engine's process gets (PPO steps measured 3-17x slower).
                    _system_config={"worker_niceness": 0},
                )
                self.started = True
                what = f"started a local Ray instance ({ncpu} CPUs)"
            else:
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
                what = f"connected to the Ray cluster at {self.address}"
        except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ... from ray.init
            where = (
                f"connect to the Ray cluster at {self.address}"
                if self.address
                else "start a local Ray instance"
            )
            raise PipelineError(f"could not {where}: {type(exc).__name__}: {exc}") from None
        self.init_seconds = time.perf_counter() - t0
        self.log(f"[ray]  {what} in {self.init_seconds:.1f} s")
        self._thread_count()

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False

    def _thread_count(self) -> int:
        if self._threads is None:
            import torch

            self._threads = int(torch.get_num_threads())
        return self._threads

    def _check_feasible(self, name: str, num_cpus: float, num_gpus: float) -> None:
        have = self.ray.cluster_resources()
        for key, want, label in (("CPU", num_cpus, "num_cpus"), ("GPU", num_gpus, "num_gpus")):
            if want and want > have.get(key, 0):
                msg = (
                    f"stage '{name}': resources.{label}={want:g} but the Ray cluster has "
                    f"{have.get(key, 0):g} {key}(s)"
                )
                if self.started:
                    raise PipelineError(msg)
                self.log(f"[warn] {msg}; the task waits until a node with them joins")

    # ------------------------------------------------------------------------------------------- stages

    def run(
        self, spec: StageSpec, resolved: dict[str, Any], work_dir: Path, outputs: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        ray = self.ray
        self.prepare()
        res = spec.resources
        num_cpus = float(res.get("num_cpus", 1))
        num_gpus = float(res.get("num_gpus", 0))
        self._check_feasible(spec.name, num_cpus, num_gpus)
        log_path = work_dir / LOG_NAME
        offset = log_path.stat().st_size if log_path.is_file() else 0
        ws = self.store.workspace
        job = {
            "spec": spec,
            "resolved": resolved,
            "work_dir": str(work_dir),
            "outputs": outputs,
            "home": str(ws.home),
            "db_url": ws.db_url,
            "env": forwarded_env(),
            "sys_path": _own_sys_path(),
            "threads": self._thread_count(),
            "log_path": str(log_path),
        }
        if self._remote is None:
            self._remote = ray.remote(_stage_task)
        remote = self._remote.options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0, name=f"alignflow-stage-{spec.name}"
        )
        ref = remote.remote(job)
        follower = _LogFollower(log_path, offset, self.log)
        try:
            while True:
                ready, _ = ray.wait([ref], timeout=POLL_S)
                follower.poll()
                if ready:
                    break
            return ray.get(ref)
        except KeyboardInterrupt:
            # As Ctrl-C locally: the recipe's SIGINT handler checkpoints; the re-run resumes.
            self.log(f"[ray]  interrupted: asking stage '{spec.name}' to stop")
            ray.cancel(ref)
            with contextlib.suppress(Exception):
                ray.get(ref, timeout=120)
            raise
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc, spec.name, log_path) from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.RayError) as exc:
            raise PipelineError(
                f"stage '{spec.name}': the Ray worker running it died ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}); its output is in "
                f"{log_path}; run the pipeline again to resume the stage"
            ) from None
        finally:
            follower.poll(final=True)


def _unwrap(exc: Any, name: str, log_path: Path) -> BaseException:
    """The exception the stage raised in the worker, as the local engine would have raised it."""
    cause = getattr(exc, "cause", None)
    if not isinstance(cause, BaseException):
        return PipelineError(f"stage '{name}' failed in its Ray task: {exc}; its output is in {log_path}")
    if not isinstance(cause, AlignflowError):
        remote_tb = getattr(exc, "traceback_str", "") or str(exc)
        cause.add_note(
            f"(raised in the Ray task of stage '{name}'; its output is in {log_path})\n{remote_tb}"
        )
    return cause.with_traceback(None)


class _LogFollower:
    """Prints the complete lines a task appends to its log file, from `offset` on."""

    def __init__(self, path: Path, offset: int, log: Callable[[str], None]) -> None:
        self.path, self.offset, self.log = path, offset, log
        self.partial = b""

    def poll(self, final: bool = False) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        if final and self.partial:
            lines.append(self.partial)
            self.partial = b""
        for line in lines:
            text = line.decode("utf-8", "replace").rstrip("\r")
            # a progress bar redraws with '\r': show its last state
            self.log(text.rsplit("\r", 1)[-1])


# ------------------------------------------------------------------------------------------- in the worker


def _stage_task(job: dict[str, Any]) -> dict[str, Any]:
    """One stage, in a Ray worker: returns its outputs as plain JSON values."""
    spec: StageSpec = job["spec"]
    work_dir = Path(job["work_dir"])
    env = {**job["env"], "ALIGNFLOW_HOME": job["home"], "ALIGNFLOW_DB_URL": job["db_url"]}
    for entry in job["sys_path"]:
        if os.path.isdir(entry) and entry not in sys.path:
            sys.path.append(entry)
    with _redirected(Path(job["log_path"])), _environment(env, job["threads"]):
        niceness = os.nice(0)
        if niceness > 0:
            print(
                f"[ray]  note: this Ray worker runs at nice {niceness} (the cluster's worker_niceness); beside "
                "other jobs the stage gets less CPU than the local engine would",
                flush=True,
            )
        store = Store.open(Workspace(home=Path(job["home"]), db_url=job["db_url"]))
        try:
            nproc = spec.resources.get("nproc")
            if spec.recipe and nproc:
                result = _run_torchrun(
                    spec, job["resolved"], work_dir, int(nproc), job["threads"], job["sys_path"]
                )
            elif spec.recipe:
                module, _, cfg = recipe_config(spec, job["resolved"], work_dir)
                result = module.run(cfg, store=store)
            else:
                ctx = StageContext(
                    store=store,
                    stage=spec.name,
                    work_dir=work_dir,
                    outputs=job["outputs"],
                    log=_print_flush,
                    round=spec.round,
                )
                result = run_call(spec, job["resolved"], ctx)
        finally:
            store.close()
        check_result(spec.name, result)
        # Plain JSON on the way back: the driver needs no torch/numpy to unpickle it (the runner does the same).
        return json.loads(json.dumps(result, default=str))


def _print_flush(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def _redirected(log_path: Path) -> Iterator[None]:
    """fd 1 and 2 (and sys.stdout/stderr) appended to `log_path` for the block, then restored."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    old_streams = sys.stdout, sys.stderr
    out = open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = out
        yield
    finally:
        with contextlib.suppress(Exception):
            out.flush()
        sys.stdout, sys.stderr = old_streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (*saved, fd):
            os.close(f)


@contextlib.contextmanager
def _environment(env: dict[str, str], threads: int) -> Iterator[None]:
    """The driver's variables and torch thread count for the block, then the worker's own again."""
    env = {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    torch_before = None
    try:
        import torch

        torch_before = torch.get_num_threads()
        torch.set_num_threads(threads)
    except ImportError:  # a call stage without torch installed
        torch = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if torch is not None and torch_before is not None:
            torch.set_num_threads(torch_before)


def _run_torchrun(
    spec: StageSpec, resolved: dict[str, Any], work_dir: Path, nproc: int, threads: int, sys_path: list[str]
) -> dict[str, Any]:
    """The recipe under `torchrun --standalone --nproc-per-node N`, through its CLI command."""
    import yaml

    _, data, _ = recipe_config(spec, resolved, work_dir)  # validated here: config errors read as locally
    cfg_path = work_dir / CONFIG_NAME
    result_path = work_dir / RESULT_NAME
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    result_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "alignflow.cli.main",
        CLI_COMMANDS[spec.recipe],  # type: ignore[index]
        str(cfg_path),
        "--result-json",
        str(result_path),
    ]
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(max(1, threads // nproc))
    env["PYTHONPATH"] = os.pathsep.join([*sys_path, *filter(None, [env.get("PYTHONPATH")])])
    print(f"[torchrun] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, check=False)
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if isinstance(result, dict) and isinstance(result.get("error"), dict) and set(result) == {"error"}:
        raise _rebuild_error(result["error"])
    # A run stopped by a signal exits non-zero (75, "requeue") after writing its {"stopped": True} result,
    # which the stage returns as the local engine does.
    if not isinstance(result, dict) or (proc.returncode != 0 and not result.get("stopped")):
        raise PipelineError(
            f"stage '{spec.name}': torchrun exited with code {proc.returncode}"
            + ("" if isinstance(result, dict) else f" and wrote no {RESULT_NAME}")
            + f"; its output is in {work_dir / LOG_NAME}"
        )
    return result


def _rebuild_error(err: dict[str, Any]) -> BaseException:
    """The AlignflowError the CLI wrote to --result-json, as its own class when it can be found."""
    import importlib

    message = str(err.get("message", ""))
    try:
        cls = getattr(importlib.import_module(str(err.get("module"))), str(err.get("type")))
        if isinstance(cls, type) and issubclass(cls, AlignflowError):
            return cls(message)
    except (ImportError, AttributeError, TypeError, ValueError):
        pass
    return PipelineError(message)

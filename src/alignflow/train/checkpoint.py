"""Training checkpoints: full state, atomic on disk, optionally written in the background, with retention.

Layout of ``run_dir``::

    run_dir/
      step-000120/            one checkpoint (never modified after its rename)
        model/model.safetensors + config.json       (full model, HF format)   or
        model/adapter_model.safetensors + adapter_config.json                  (LoRA adapter only)
        optimizer.pt  scheduler.pt  rng.pt
        trainer_state.json    step, saved_at, data position, resolved config, metrics
        manifest.json         sha256 and size of every other file (written last)
      latest                  text file naming the newest committed checkpoint (updated last)
      best                    with a ``best_metric``: text file naming the best checkpoint so far, and
      best.json               the kept best-k (``keep_best``) as [{"step", "value", "name"}], best first

A save writes everything into ``.tmp-step-000120-<uuid>`` in the same directory, fsyncs each file and
the directory, renames it to ``step-000120`` (atomic on POSIX within one filesystem), fsyncs
``run_dir``, and only then replaces ``latest`` (write temp file, fsync, ``os.replace``). A crash at any
point leaves either the previous state or the new one, never a half checkpoint behind ``latest``.

Loading verifies the manifest; a checkpoint whose files are missing, truncated or altered is skipped
with a warning naming the bad file, and the newest older checkpoint that verifies is used.

Single writer per ``run_dir`` is assumed (one training process, or rank 0 under torch.distributed).
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import math
import os
import random
import re
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from alignflow.errors import StoreError
from alignflow.store.files import fsync_path, sha256_file

logger = logging.getLogger(__name__)

STEP_PREFIX = "step-"
LATEST = "latest"
BEST = "best"
BEST_FILE = "best.json"
MANIFEST = "manifest.json"
DCP_DIR = "dcp"  # torch.distributed.checkpoint shards of model + optimizer (a torchrun job's checkpoint)
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(StoreError):
    """A checkpoint cannot be written or restored."""


class CheckpointWarning(UserWarning):
    """A checkpoint was found damaged and skipped."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


# ---------------------------------------------------------------------------------------------------------------------
# snapshotting (main thread): copy everything the writer needs so training may continue immediately


class _CpuCopier:
    """Deep-copies state with every tensor cloned to contiguous CPU memory, detached from the live model.

    Buffers from the previous snapshot are reused when shapes and dtypes match, in traversal order:
    copying into memory that is already mapped avoids page-faulting hundreds of MB on every save,
    which is most of the training stall of an async save. Reuse is safe because a new snapshot is only
    taken after the previous write has finished.
    """

    def __init__(self, pool: list[torch.Tensor] | None = None) -> None:
        self.pool = pool or []
        self.used: list[torch.Tensor] = []

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        src = t.detach()
        k = len(self.used)
        buf = self.pool[k] if k < len(self.pool) else None
        if buf is not None and buf.shape == src.shape and buf.dtype == src.dtype:
            buf.copy_(src)
        else:
            buf = src.to("cpu", copy=True).contiguous()
        self.used.append(buf)
        return buf

    def copy(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if isinstance(obj, Mapping):
            return {k: self.copy(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.copy(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self.copy(v) for v in obj)
        return copy.deepcopy(obj)


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's state holds an ndarray, which torch.load(weights_only=True) refuses; store it as a tensor.
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    # torch.save keeps tuples, but be lenient with lists (random.setstate requires tuples).
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return False
    return isinstance(model, PeftModel)


def _json_checked(name: str, value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint field {name!r} must be JSON-serialisable: {exc}") from exc
    return copy.deepcopy(value)


@dataclass
class _Snapshot:
    step: int
    saved_at: float
    adapter_only: bool
    weights: dict[str, torch.Tensor]
    model_config_json: str | None
    generation_config_json: str | None
    peft_config: Any
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    rng: dict[str, Any] | None
    data_state: Any
    config: Any
    metrics: dict[str, float]


# ---------------------------------------------------------------------------------------------------------------------
# writing (background or foreground)


def _write_snapshot(snap: _Snapshot, tmp: Path) -> None:
    from safetensors.torch import save_file

    model_dir = tmp / "model"
    model_dir.mkdir(parents=True)
    if snap.adapter_only:
        save_file(snap.weights, str(model_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        snap.peft_config.save_pretrained(str(model_dir))
    else:
        save_file(snap.weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
        if snap.model_config_json is not None:
            (model_dir / "config.json").write_text(snap.model_config_json)
        if snap.generation_config_json is not None:
            (model_dir / "generation_config.json").write_text(snap.generation_config_json)
    if snap.optimizer is not None:
        torch.save(snap.optimizer, tmp / "optimizer.pt")
    if snap.scheduler is not None:
        torch.save(snap.scheduler, tmp / "scheduler.pt")
    if snap.rng is not None:
        torch.save(snap.rng, tmp / "rng.pt")
    state = {
        "format_version": FORMAT_VERSION,
        "step": snap.step,
        "saved_at": snap.saved_at,
        "adapter_only": snap.adapter_only,
        "data_state": snap.data_state,
        "config": snap.config,
        "metrics": snap.metrics,
    }
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    _write_manifest(tmp)


def _write_manifest(tmp: Path) -> None:
    """sha256 and size of every file in ``tmp``, fsynced, then the manifest itself (the last file written)."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {"format_version": FORMAT_VERSION, "files": {}}
    for p in files:
        fsync_path(p)
        rel = p.relative_to(tmp).as_posix()
        manifest["files"][rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    mpath = tmp / MANIFEST
    with open(mpath, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for d in sorted({p.parent for p in files} | {tmp}, key=lambda x: -len(x.parts)):
        fsync_path(d)


def _write_latest(run_dir: Path, name: str, pointer: str = LATEST) -> None:
    tmp = run_dir / f".{LATEST}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / pointer)
    fsync_path(run_dir)


def _remove_dir(path: Path) -> None:
    # Rename first so a crash mid-delete never leaves a half-deleted directory under a checkpoint name.
    trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _commit(run_dir: Path, snap: _Snapshot) -> Path:
    name = step_dir_name(snap.step)
    tmp = run_dir / f".tmp-{name}-{uuid.uuid4().hex}"
    try:
        _write_snapshot(snap, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(run_dir, tmp, name)


def _publish(run_dir: Path, tmp: Path, name: str) -> Path:
    """Rename a fully written ``tmp`` (manifest included) to ``name`` and point ``latest`` at it."""
    final = run_dir / name
    if final.exists():
        # Re-saving a step (e.g. after resuming from an older `latest`): replace the old directory.
        _remove_dir(final)
    os.rename(tmp, final)
    fsync_path(run_dir)
    _write_latest(run_dir, name)
    return final


# ---------------------------------------------------------------------------------------------------------------------
# verification and loading


def verify_checkpoint(path: str | os.PathLike[str]) -> str | None:
    """Check ``path`` against its manifest; ``None`` if intact, else a message naming the bad file."""
    p = Path(path)
    mpath = p / MANIFEST
    if not p.is_dir():
        return f"{p} does not exist"
    if not mpath.is_file():
        return f"{mpath} is missing (checkpoint incomplete)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"{mpath} is corrupt ({exc})"
    for rel, meta in files.items():
        f = p / rel
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != meta["size"]:
            return f"{f} is truncated or resized ({size} bytes, manifest says {meta['size']})"
        if sha256_file(f) != meta["sha256"]:
            return f"{f} fails its sha256 check (tampered or corrupt)"
    return None


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint; call :meth:`restore` (or the individual loaders) to apply it.

    Either format loads at any world size: a ``dcp/`` checkpoint (written by a torchrun job) is resharded by
    ``torch.distributed.checkpoint`` into whatever layout the live model has (one process, DDP, FSDP2), and a
    single-file checkpoint loads into a distributed model as a full state dict.
    """

    path: Path
    step: int
    saved_at: float
    adapter_only: bool
    data_state: Any
    config: Any
    metrics: dict[str, float] = field(default_factory=dict)
    dist: Any = None  # alignflow.train.distributed.DistContext of the loading process

    @property
    def is_dcp(self) -> bool:
        return (self.path / DCP_DIR).is_dir()

    def load_model(self, model: nn.Module) -> None:
        """Load weights into ``model`` in place (strict: every key must match)."""
        from safetensors.torch import load_file

        if self.is_dcp:
            self._load_dcp(model, None)
            return
        if _dist_enabled(self.dist):
            self._load_full_into_distributed(model, None)
            return

        if self.adapter_only:
            from peft import set_peft_model_state_dict

            weights = load_file(str(self.path / "model" / "adapter_model.safetensors"))
            result = set_peft_model_state_dict(model, weights)
            if result.unexpected_keys:
                raise CheckpointError(
                    f"{self.path / 'model'}: adapter keys not in the model: {result.unexpected_keys[:5]}"
                )
            return
        weights = load_file(str(self.path / "model" / "model.safetensors"))
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{self.path / 'model' / 'model.safetensors'} does not match the model: "
                f"{str(exc).splitlines()[0]}"
            ) from exc

    def _load_dcp(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        opts = StateDictOptions(ignore_frozen_params=self.adapter_only)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            if optimizer is None:
                msd = get_model_state_dict(model, options=opts)
                state: dict[str, Any] = {"model": msd}
                dcp.load(state, checkpoint_id=str(self.path / DCP_DIR))
                set_model_state_dict(model, state["model"], options=opts)
                return
            msd, osd = get_state_dict(model, optimizer, options=opts)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=str(self.path / DCP_DIR))
            set_state_dict(
                model,
                optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optim"],
                options=opts,
            )

    def _load_full_into_distributed(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """A single-file (one-process) checkpoint into a DDP or FSDP2 model: every rank reads the full state."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from alignflow.train.distributed import unwrap

        if self.adapter_only:
            if getattr(self.dist, "strategy", "ddp") == "fsdp":
                raise CheckpointError(
                    f"{self.path}: a one-process LoRA checkpoint cannot resume under FSDP; resume it with "
                    "train.distributed.strategy=ddp"
                )
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(
                unwrap(model), load_file(str(self.path / "model" / "adapter_model.safetensors"))
            )
            if optimizer is not None:
                optimizer.load_state_dict(torch.load(self.path / "optimizer.pt", weights_only=True))
            return
        full_opts = StateDictOptions(full_state_dict=True)
        weights = load_file(str(self.path / "model" / "model.safetensors"))
        set_model_state_dict(model, weights, options=full_opts)
        if optimizer is not None:
            saved = torch.load(self.path / "optimizer.pt", weights_only=True)
            set_optimizer_state_dict(
                model, optimizer, _fqn_optimizer_state(model, optimizer, saved), options=full_opts
            )

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        f = self.path / "optimizer.pt"
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: this checkpoint was saved without an optimizer")
        optimizer.load_state_dict(torch.load(f, weights_only=True))

    def load_scheduler(self, scheduler: Any) -> None:
        f = self.path / "scheduler.pt"
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: this checkpoint was saved without a scheduler")
        scheduler.load_state_dict(torch.load(f, weights_only=True))

    def restore_rng(self) -> None:
        rank = getattr(self.dist, "rank", 0)
        # this rank's state; at a larger world size than the save's, the new ranks start from rank 0's
        candidates = [self.path / f"rng-{rank}.pt", self.path / "rng-0.pt", self.path / "rng.pt"]
        f = next((c for c in candidates if c.is_file()), candidates[-1])
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: this checkpoint was saved without RNG states")
        _set_rng_state(torch.load(f, weights_only=True))

    def restore(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        rng: bool = True,
    ) -> Any:
        """Restore model, optimizer, scheduler and RNG states; return the saved data position."""
        if self.is_dcp:
            self._load_dcp(model, optimizer)
        elif _dist_enabled(self.dist):
            self._load_full_into_distributed(model, optimizer)
        else:
            self.load_model(model)
            if optimizer is not None:
                self.load_optimizer(optimizer)
        if scheduler is not None:
            self.load_scheduler(scheduler)
        if rng:
            self.restore_rng()
        return self.data_state


def _dist_enabled(dist: Any) -> bool:
    return dist is not None and getattr(dist, "world_size", 1) > 1


def _fqn_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]
) -> dict[str, Any]:
    """A one-process optimizer state dict (keyed by parameter index) re-keyed by parameter name.

    The index order is the live optimizer's own: its param groups were built the same way, over the same
    parameters, as the saved one's (``alignflow.train.optim.build_optimizer``).
    """
    from alignflow.train.distributed import unwrap

    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = []
    k = 0
    for g in saved["param_groups"]:
        n = len(g["params"])
        groups.append({**g, "params": order[k : k + n]})
        k += n
    state = {order[int(i)]: v for i, v in saved["state"].items()}
    return {"state": state, "param_groups": groups}


def _read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Committed checkpoint directories in ``run_dir``, oldest step first (not verified)."""
    rd = Path(run_dir)
    if not rd.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in rd.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _warn_bad(msg: str) -> None:
    logger.warning(msg)
    warnings.warn(msg, CheckpointWarning, stacklevel=3)


def load_latest(run_dir: str | os.PathLike[str]) -> LoadedCheckpoint | None:
    """The newest intact checkpoint: the one ``latest`` names, else the newest older one that verifies.

    Checkpoints newer than ``latest`` are ignored (the pointer is the commit point). Returns ``None``
    when ``run_dir`` holds no checkpoint at all; damaged ones are skipped with a :class:`CheckpointWarning`.
    """
    rd = Path(run_dir)
    all_ckpts = list_checkpoints(rd)
    pointer_file = rd / LATEST
    order: list[Path]
    if pointer_file.is_file():
        name = pointer_file.read_text().strip()
        m = _STEP_RE.match(name)
        if m is None:
            _warn_bad(f"{pointer_file} is corrupt (content {name[:40]!r}); scanning checkpoint directories")
            order = list(reversed(all_ckpts))
        else:
            limit = int(m.group(1))
            older = [p for p in reversed(all_ckpts) if int(_STEP_RE.match(p.name).group(1)) < limit]
            order = [rd / name, *older]
    else:
        order = list(reversed(all_ckpts))
    for path in order:
        problem = verify_checkpoint(path)
        if problem is None:
            try:
                st = _read_state(path)
            except (json.JSONDecodeError, OSError) as exc:  # verified, so only a format bug gets here
                problem = f"{path / STATE_FILE} is unreadable ({exc})"
            else:
                return LoadedCheckpoint(
                    path=path,
                    step=int(st["step"]),
                    saved_at=float(st["saved_at"]),
                    adapter_only=bool(st["adapter_only"]),
                    data_state=st.get("data_state"),
                    config=st.get("config"),
                    metrics=st.get("metrics") or {},
                )
        _warn_bad(f"skipping damaged checkpoint: {problem}; falling back to the previous one")
    return None


# ---------------------------------------------------------------------------------------------------------------------
# retention


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    saved_at: float  # seconds since the epoch (the manager's clock)
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints to keep.

    * everything saved in the last ``keep_recent_minutes``;
    * the first checkpoint of each clock hour for the last ``hourly_for_hours`` hours;
    * beyond that, the first checkpoint of each calendar day (UTC) if ``keep_daily``;
    * always the ``keep_last`` newest steps, and the ``keep_best`` best by ``best_metric`` (``best_mode``
      min or max) among the checkpoints whose recorded metrics carry it (ties: the earlier step).

    "First of each bucket" (not last) makes the choice stable: once a bucket has a representative it
    never changes, so a checkpoint kept hourly is still there to become the daily one.
    """

    keep_recent_minutes: float = 60.0
    hourly_for_hours: float = 24.0
    keep_daily: bool = True
    keep_last: int = 1
    best_metric: str | None = None
    best_mode: Literal["min", "max"] = "min"
    keep_best: int = 1

    def __post_init__(self) -> None:
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"RetentionPolicy.best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.keep_last < 1:
            raise ValueError(f"RetentionPolicy.keep_last must be >= 1, got {self.keep_last}")
        if self.keep_best < 1:
            raise ValueError(f"RetentionPolicy.keep_best must be >= 1, got {self.keep_best}")

    def score(self, metrics: Mapping[str, Any]) -> float | None:
        """The ``best_metric`` value of ``metrics`` signed so that lower is better; None when absent/non-finite."""
        if self.best_metric is None or self.best_metric not in metrics:
            return None
        try:
            value = float(metrics[self.best_metric])
        except (TypeError, ValueError):
            return None
        if not math.isfinite(value):
            return None
        return value if self.best_mode == "min" else -value

    def best(self, checkpoints: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
        """The ``keep_best`` best checkpoints by ``best_metric``, best first (ties: the earlier step)."""
        scored = [(s, c.step, c) for c in checkpoints if (s := self.score(c.metrics)) is not None]
        return [c for _, _, c in sorted(scored, key=lambda t: (t[0], t[1]))[: self.keep_best]]

    def select(self, checkpoints: Sequence[CheckpointInfo], now: float) -> set[int]:
        """Steps to keep among ``checkpoints`` at time ``now``."""
        keep: set[int] = set()
        by_step = sorted(checkpoints, key=lambda c: c.step)
        keep.update(c.step for c in by_step[-self.keep_last :])
        recent_s = self.keep_recent_minutes * 60.0
        hourly_s = self.hourly_for_hours * 3600.0
        hour_first: dict[int, CheckpointInfo] = {}
        day_first: dict[int, CheckpointInfo] = {}
        for c in sorted(checkpoints, key=lambda c: (c.saved_at, c.step)):
            age = now - c.saved_at
            if age <= recent_s:
                keep.add(c.step)
            elif age <= hourly_s:
                hour_first.setdefault(math.floor(c.saved_at / 3600.0), c)
            elif self.keep_daily:
                day_first.setdefault(math.floor(c.saved_at / 86400.0), c)
        keep.update(c.step for c in hour_first.values())
        keep.update(c.step for c in day_first.values())
        keep.update(c.step for c in self.best(checkpoints))
        return keep


# ---------------------------------------------------------------------------------------------------------------------
# manager


class CheckpointManager:
    """Save and load training checkpoints in ``run_dir``; see the module docstring for the layout.

    ``save(..., blocking=False)`` copies all state to CPU memory in the calling thread, then writes it
    from a background thread while training continues. A second save waits for the first. An error in
    the writer is re-raised by the next ``save``, ``wait`` or ``close``. ``close`` (also at interpreter
    exit and on leaving a ``with`` block) waits for the pending write.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        retention: RetentionPolicy | None = None,
        clock: Callable[[], float] = time.time,
        save_rng: bool = True,
        reuse_buffers: bool = True,
        dist: Any = None,
        format: Literal["auto", "single", "dcp"] = "auto",
    ) -> None:
        self.run_dir = Path(run_dir)
        # Under torchrun (dist.world_size > 1) every rank calls save/load: the model and optimizer go to
        # torch.distributed.checkpoint shards, rank 0 writes the rest and commits; see _save_dcp. `format`
        # "dcp" forces that format in one process too (benchmarks/bench_distributed.py compares the two).
        if format == "single" and _dist_enabled(dist):
            raise CheckpointError(
                "a torchrun job (world size > 1) saves distributed checkpoints (format dcp)"
            )
        if dist is None:
            from alignflow.train.distributed import DistContext

            dist = DistContext()
        self.dist = dist
        self.distributed = _dist_enabled(dist) or format == "dcp"
        self.is_main = dist.is_main
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.retention = retention
        self.clock = clock
        self.save_rng = save_rng
        # Keeps one CPU copy of the state alive between saves (see _CpuCopier) in exchange for a shorter stall.
        self.reuse_buffers = reuse_buffers
        self._pool: list[torch.Tensor] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        self.last_stall_seconds = 0.0  # time the caller was blocked in the last save()
        self._saved_step: int | None = None  # the last step this manager saved (a second save is a no-op)
        self._scores: dict[int, float] | None = None  # step -> signed best_metric of the saved checkpoints
        if self.is_main:
            self._clean_stale_temp_dirs()
        atexit.register(self._atexit)

    def _clean_stale_temp_dirs(self) -> None:
        # Left behind by a process killed mid-save; no save of ours is in flight yet.
        for p in self.run_dir.iterdir():
            if p.name.startswith((".tmp-", ".trash-")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(f".{LATEST}.tmp-"):
                p.unlink(missing_ok=True)

    # -- saving --------------------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        data_state: Any = None,
        config: Any = None,
        metrics: Mapping[str, float] | None = None,
        blocking: bool = True,
        adapter_only: bool | None = None,
    ) -> Path:
        """Checkpoint ``step``; returns the final directory (already written when ``blocking``).

        ``adapter_only`` defaults to True for a ``peft`` model (save just the LoRA weights) and False
        otherwise. ``data_state`` (e.g. a sampler's ``state_dict()``), ``config`` and ``metrics`` must be
        JSON-serialisable.
        """
        t0 = time.perf_counter()
        if self._closed:
            raise CheckpointError(f"CheckpointManager for {self.run_dir} is closed")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        final = self.run_dir / step_dir_name(step)
        if step == self._saved_step:
            # The same step again (a best checkpoint, then the periodic or stop save of that step): the state
            # has not changed in between, so the copy being written is it; a blocking save waits for it.
            if blocking:
                self._join()
            self.last_stall_seconds = time.perf_counter() - t0
            return final
        self._join()  # a second save waits for the first (and re-raises its error)
        if self.distributed:
            self._save_dcp(
                step, model, optimizer, scheduler, data_state, config, metrics, adapter_only, blocking
            )
            self.last_stall_seconds = time.perf_counter() - t0
            return final
        snap = self._snapshot(step, model, optimizer, scheduler, data_state, config, metrics, adapter_only)
        self._saved_step = step
        score = self.retention.score(snap.metrics) if self.retention is not None else None
        if score is not None:
            self._known_scores()[step] = score
        if blocking:
            self._write_and_prune(snap)
        else:
            self._thread = threading.Thread(
                target=self._run_background, args=(snap,), name=f"alignflow-ckpt-{step}", daemon=False
            )
            self._thread.start()
        self.last_stall_seconds = time.perf_counter() - t0
        return final

    def _snapshot(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any | None,
        data_state: Any,
        config: Any,
        metrics: Mapping[str, float] | None,
        adapter_only: bool | None,
    ) -> _Snapshot:
        copier = _CpuCopier(self._pool if self.reuse_buffers else None)
        peft = _is_peft(model)
        if adapter_only is None:
            adapter_only = peft
        if adapter_only and not peft:
            raise CheckpointError(
                "adapter_only=True needs a peft model (a policy loaded with lora=LoraSpec(...))"
            )
        peft_config = None
        if adapter_only:
            from peft import get_peft_model_state_dict

            weights = copier.copy(get_peft_model_state_dict(model))
            peft_config = copy.deepcopy(model.peft_config[model.active_adapter])
        else:
            weights = copier.copy(model.state_dict())
        cfg = getattr(model, "config", None)
        gen = getattr(model, "generation_config", None)
        snap = _Snapshot(
            step=step,
            saved_at=float(self.clock()),
            adapter_only=adapter_only,
            weights=weights,
            model_config_json=cfg.to_json_string() if hasattr(cfg, "to_json_string") and not peft else None,
            generation_config_json=gen.to_json_string()
            if hasattr(gen, "to_json_string") and not peft
            else None,
            peft_config=peft_config,
            optimizer=copier.copy(optimizer.state_dict()) if optimizer is not None else None,
            scheduler=copier.copy(scheduler.state_dict()) if scheduler is not None else None,
            rng=_rng_state() if self.save_rng else None,
            data_state=_json_checked("data_state", data_state),
            config=_json_checked("config", config),
            metrics={k: float(v) for k, v in (metrics or {}).items()},
        )
        if self.reuse_buffers:
            self._pool = copier.used
        return snap

    def _save_dcp(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any | None,
        data_state: Any,
        config: Any,
        metrics: Mapping[str, float] | None,
        adapter_only: bool | None,
        blocking: bool = True,
    ) -> None:
        """A collective save: every rank writes its shards and RNG state, rank 0 the rest, then commits.

        The shards are written from the live tensors and the commit (manifest, rename, ``latest``,
        retention) is rank 0's as in one process. Always synchronous (``blocking`` is ignored): with
        ``dcp.async_save``, whose background collectives need a process group of their own, a torchrun
        restart after a killed rank hung in its rendezvous in our tests. The run folder must be on a
        filesystem every node sees (the usual requirement of torch.distributed.checkpoint).
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        from alignflow.train.distributed import unwrap

        dist = self.dist
        inner = unwrap(model)
        peft = _is_peft(inner)
        adapter_only = peft if adapter_only is None else adapter_only
        name = step_dir_name(step)
        tmp = Path(dist.broadcast(str(self.run_dir / f".tmp-{name}-{uuid.uuid4().hex}")))
        if dist.is_main:
            tmp.mkdir(parents=True)
        dist.barrier()
        opts = StateDictOptions(ignore_frozen_params=adapter_only)
        if optimizer is not None:
            msd, osd = get_state_dict(model, optimizer, options=opts)
            state: dict[str, Any] = {"model": msd, "optim": osd}
        else:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            state = {"model": get_model_state_dict(model, options=opts)}
        if self.save_rng:
            torch.save(_rng_state(), tmp / f"rng-{dist.rank}.pt")
        sched = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
        inner_cfg = getattr(inner, "config", None)
        cfg_json = inner_cfg.to_json_string() if hasattr(inner_cfg, "to_json_string") and not peft else None
        doc = {
            "format_version": FORMAT_VERSION,
            "format": "dcp",
            "world_size": dist.world_size,
            "strategy": dist.strategy,
            "step": step,
            "saved_at": float(self.clock()),
            "adapter_only": adapter_only,
            "data_state": _json_checked("data_state", data_state),
            "config": _json_checked("config", config),
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        }
        self._saved_step = step
        dcp.save(state, checkpoint_id=str(tmp / DCP_DIR))
        dist.barrier()  # every rank's files are on disk
        if dist.is_main:
            self._commit_dcp(tmp, name, doc, sched, cfg_json)
        dist.barrier()  # committed before any rank goes on (a following load or exit sees it)

    def _commit_dcp(
        self, tmp: Path, name: str, doc: dict[str, Any], sched: Any, cfg_json: str | None
    ) -> None:
        """Rank 0: the files besides the shards, the manifest, the rename and ``latest``, then retention."""
        step = int(doc["step"])
        try:
            if cfg_json is not None:
                (tmp / "model-config.json").write_text(cfg_json)
            if sched is not None:
                torch.save(sched, tmp / "scheduler.pt")
            (tmp / STATE_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True))
            _write_manifest(tmp)
            _publish(self.run_dir, tmp, name)
            score = self.retention.score(doc["metrics"]) if self.retention is not None else None
            if score is not None:
                self._known_scores()[step] = score
            if self.retention is not None:
                self._prune()
                self._mark_best()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _run_background(self, snap: _Snapshot) -> None:
        try:
            self._write_and_prune(snap)
        except BaseException as exc:  # re-raised in the training thread by the next call
            self._error = exc

    def improves(self, metrics: Mapping[str, Any]) -> bool:
        """True when ``metrics`` carry the retention's ``best_metric`` and a checkpoint of them would rank among
        the ``keep_best`` best saved so far (a tie with a kept one does not: the earlier step wins)."""
        if self.distributed:  # rank 0 decides: every rank must take part in the save, or none
            return bool(self.dist.broadcast(self._improves(metrics) if self.is_main else None))
        return self._improves(metrics)

    def _improves(self, metrics: Mapping[str, Any]) -> bool:
        score = self.retention.score(metrics) if self.retention is not None else None
        if score is None:
            return False
        assert self.retention is not None
        kept = sorted(self._known_scores().values())[: self.retention.keep_best]
        return len(kept) < self.retention.keep_best or score < kept[-1]

    def save_if_best(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        data_state: Any = None,
        config: Any = None,
        metrics: Mapping[str, float] | None = None,
        blocking: bool = True,
    ) -> bool:
        """Checkpoint ``step`` when its ``metrics`` improve on the best-k (:meth:`improves`); True if saved.

        Held-out and eval metrics are logged only every few steps, rarely on a periodic save's step; saving
        when they improve is what lets ``checkpoint.best_metric`` name any logged metric.
        """
        if not self.improves(metrics or {}):
            return False
        self.save(step, model, optimizer, scheduler, data_state, config, metrics, blocking=blocking)
        return True

    def best_checkpoint(self) -> Path | None:
        """The best checkpoint so far by ``best_metric`` (the ``best`` pointer); None without one."""
        self._join()
        pointer = self.run_dir / BEST
        if not pointer.is_file():
            return None
        path = self.run_dir / pointer.read_text().strip()
        return path if path.is_dir() else None

    def _known_scores(self) -> dict[int, float]:
        if self._scores is None:  # first use: the checkpoints already on disk (a resumed run's)
            self._scores = {}
            for info in self._infos()[0]:
                score = self.retention.score(info.metrics) if self.retention is not None else None
                if score is not None:
                    self._scores[info.step] = score
        return self._scores

    def _write_and_prune(self, snap: _Snapshot) -> None:
        _commit(self.run_dir, snap)
        if self.retention is not None:
            self._prune()
            self._mark_best()

    def _infos(self) -> tuple[list[CheckpointInfo], dict[int, Path]]:
        infos: list[CheckpointInfo] = []
        paths: dict[int, Path] = {}
        for p in list_checkpoints(self.run_dir):
            try:
                st = _read_state(p)
            except (OSError, json.JSONDecodeError):
                continue  # unreadable: leave it for a human to inspect rather than guess
            info = CheckpointInfo(
                step=int(st["step"]), saved_at=float(st["saved_at"]), metrics=st.get("metrics") or {}
            )
            infos.append(info)
            paths[info.step] = p
        return infos, paths

    def _mark_best(self) -> None:
        """Point ``best`` at the best checkpoint on disk and list the best-k in ``best.json`` (atomically)."""
        assert self.retention is not None
        if self.retention.best_metric is None:
            return
        best = self.retention.best(self._infos()[0])
        if not best:
            return
        rows = [
            {
                "step": c.step,
                "value": float(c.metrics[self.retention.best_metric]),
                "name": step_dir_name(c.step),
            }
            for c in best
        ]
        doc = {"metric": self.retention.best_metric, "mode": self.retention.best_mode, "best": rows}
        tmp = self.run_dir / f".{LATEST}.tmp-{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.run_dir / BEST_FILE)
        _write_latest(self.run_dir, rows[0]["name"], pointer=BEST)

    def _prune(self) -> None:
        assert self.retention is not None
        infos, paths = self._infos()
        keep = self.retention.select(infos, now=float(self.clock()))
        pointer = (self.run_dir / LATEST).read_text().strip() if (self.run_dir / LATEST).is_file() else None
        for info in infos:
            p = paths[info.step]
            if info.step not in keep and p.name != pointer:
                _remove_dir(p)
                logger.info("retention: removed %s", p)

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"background checkpoint save in {self.run_dir} failed: {err}") from err

    def wait(self) -> None:
        """Block until the pending background save is on disk; re-raise its error if it failed."""
        self._join()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        self._join()

    def _atexit(self) -> None:
        try:
            self.close()
        except CheckpointError as exc:
            logger.error("%s", exc)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- loading -------------------------------------------------------------------------------------------------

    def load_latest(self) -> LoadedCheckpoint | None:
        """See :func:`load_latest`; waits for a pending save first. Under torchrun rank 0 picks (and verifies)
        the checkpoint and every rank loads that one."""
        self._join()
        if not self.distributed:
            return load_latest(self.run_dir)
        found = load_latest(self.run_dir) if self.is_main else None
        found = self.dist.broadcast(found)
        if found is not None:
            found.dist = self.dist
        return found

    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.run_dir)

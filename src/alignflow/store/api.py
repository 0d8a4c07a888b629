"""The store API: content-addressed artifacts with lineage, runs and metrics.

Write protocol (why a crash never leaves a row pointing at a missing or partial file):
1. the bytes go to `artifacts/tmp/<random>` and are fsynced;
2. the file (or folder) is renamed to its content-addressed path, and the folder fsynced;
3. only then is the row inserted, in one transaction with its tags and lineage edges.
A crash between 2 and 3 leaves an unreferenced file, which the next put of the same
content reuses after checking its hash. A crash before 2 leaves a staging file in `artifacts/tmp/`,
removed the next time a store opens on the workspace (`Workspace.collect_tmp`) or by
`alignflow workspace gc`; a write that fails with an exception removes its own.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from alignflow.errors import IntegrityError, StoreError
from alignflow.store import db
from alignflow.store.files import CHUNK, fsync_path, sha256_file
from alignflow.store.models import Alert, Artifact, ArtifactTag, LineageEdge, Metric, Run, utcnow
from alignflow.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArtifactInfo:
    id: str
    kind: str
    uri: str
    bytes: int
    checksum: str
    created_at: datetime
    name: str | None
    run_id: str | None
    meta: dict[str, Any]
    tags: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["created_at"] = self.created_at.isoformat()
        d["tags"] = list(self.tags)
        return d


@dataclass(frozen=True)
class AlertRecord:
    """One stored alert row (`Store.alerts`). `value`/`threshold` are None where they were NaN/Inf or absent."""

    id: int
    run_id: str
    step: int
    rule: str
    severity: str
    metric: str
    value: float | None
    threshold: float | None
    message: str
    actions: tuple[str, ...]
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["created_at"] = self.created_at.isoformat()
        d["actions"] = list(self.actions)
        return d


@dataclass
class LineageGraph:
    root: str
    direction: str
    nodes: dict[str, ArtifactInfo] = field(default_factory=dict)
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # (parent, child, role)

    def as_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "direction": self.direction,
            "nodes": {k: v.as_dict() for k, v in self.nodes.items()},
            "edges": [{"parent": p, "child": c, "role": r} for p, c, r in self.edges],
        }


def dataset_content_hash(kind: str, rows: Iterable[Mapping[str, Any]]) -> str:
    """Hash of a dataset's logical content, independent of Parquet encoder details."""
    h = hashlib.sha256(f"alignflow-dataset-v1\n{kind}\n".encode())
    for row in rows:
        h.update(
            json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode()
        )
        h.update(b"\n")
    return h.hexdigest()


def directory_manifest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _manifest_hash(kind: str, manifest: Mapping[str, str]) -> str:
    body = "".join(f"{k}\t{v}\n" for k, v in sorted(manifest.items()))
    return hashlib.sha256(f"alignflow-dir-v1\n{kind}\n{body}".encode()).hexdigest()


def code_version() -> str:
    from alignflow import __version__

    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if rev.returncode == 0 and rev.stdout.strip():
            return f"{__version__}+{rev.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


class Store:
    """Artifacts, lineage, runs and metrics of one workspace."""

    def __init__(self, workspace: Workspace, engine: Engine) -> None:
        self.workspace = workspace
        self.engine = engine
        self._sessions = db.session_factory(engine)

    @classmethod
    def open(cls, workspace: Workspace | None = None, auto_init: bool = True) -> Store:
        ws = workspace or Workspace.from_env()
        ws.ensure_dirs()
        try:
            for entry in ws.collect_tmp():
                log.info("removed orphaned staging file %s (%s)", entry.path, entry.reason)
        except OSError as exc:  # housekeeping must never stop the store from opening
            log.warning("could not clean %s: %s", ws.tmp_dir, exc)
        engine = db.make_engine(ws.db_url)
        db.ensure_schema(engine, auto_init=auto_init)
        return cls(ws, engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    # ------------------------------------------------------------------ artifacts

    def _final_path(self, kind: str, digest: str, suffix: str) -> Path:
        return self.workspace.artifact_root / kind / digest[:2] / f"{digest}{suffix}"

    def _tmp_path(self) -> Path:
        return self.workspace.new_tmp_path()

    def _publish_file(self, tmp: Path, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        fsync_path(final.parent)

    def put_dataset(
        self,
        rows: Sequence[Mapping[str, Any]] | pa.Table,
        kind: str,
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        parents: Iterable[tuple[str, str]] = (),
        run_id: str | None = None,
    ) -> str:
        """Store rows as a Parquet dataset artifact; return its content-hash id."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))
        if table.num_rows == 0:
            raise StoreError(f"refusing to store an empty {kind} dataset")
        digest = dataset_content_hash(kind, table.to_pylist())
        final = self._final_path(kind, digest, ".parquet")
        if not (final.exists() and self._file_ok(final)):
            tmp = self._tmp_path()
            try:
                with open(tmp, "wb") as f:
                    pq.write_table(table, f, compression="zstd")
                    f.flush()
                    os.fsync(f.fileno())
                self._publish_file(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)  # a no-op once published
        info = dict(meta or {})
        info.setdefault("num_rows", table.num_rows)
        info.setdefault("columns", table.column_names)
        return self._register(digest, kind, final, name, info, tags, parents, run_id)

    def put_file(
        self,
        path: str | os.PathLike[str],
        kind: str,
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        parents: Iterable[tuple[str, str]] = (),
        run_id: str | None = None,
    ) -> str:
        """Copy one file (a report, a config) into the store."""
        src = Path(path)
        tmp = self._tmp_path()
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, CHUNK)
                fout.flush()
                os.fsync(fout.fileno())
            digest = sha256_file(tmp)
            final = self._final_path(kind, digest, src.suffix)
            if not (final.exists() and self._file_ok(final)):
                self._publish_file(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)  # a no-op once published
        return self._register(digest, kind, final, name or src.name, dict(meta or {}), tags, parents, run_id)

    def put_json(self, obj: Any, kind: str, name: str | None = None, **kw: Any) -> str:
        """Store a JSON document (e.g. a resolved config) as a file artifact."""
        data = json.dumps(obj, sort_keys=True, indent=1, default=str).encode()
        tmp = self._tmp_path()
        tmp.write_bytes(data)
        try:
            return self.put_file(tmp, kind, name=name or f"{kind}.json", **kw)
        finally:
            tmp.unlink(missing_ok=True)

    def put_directory(
        self,
        path: str | os.PathLike[str],
        kind: str,
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        parents: Iterable[tuple[str, str]] = (),
        run_id: str | None = None,
    ) -> str:
        """Copy a folder (a Hugging Face checkpoint) into the store; its id hashes every file."""
        src = Path(path)
        if not src.is_dir():
            raise StoreError(f"{src}: not a directory")
        manifest = directory_manifest(src)
        digest = _manifest_hash(kind, manifest)
        final = self._final_path(kind, digest, "")
        if not (final.exists() and self._dir_ok(final, kind, digest)):
            tmp = self._tmp_path().with_suffix(".dir")
            try:
                shutil.copytree(src, tmp)
                for p in tmp.rglob("*"):
                    if p.is_file():
                        with open(p, "rb") as f:
                            os.fsync(f.fileno())
                if final.exists():
                    shutil.rmtree(final)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
                fsync_path(final.parent)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # a no-op once published
        info = dict(meta or {})
        info.setdefault("files", len(manifest))
        return self._register(digest, kind, final, name or src.name, info, tags, parents, run_id)

    def lookup_directory(
        self, path: str | os.PathLike[str], kinds: Iterable[str] = ("checkpoint", "model")
    ) -> str | None:
        """The id of a stored folder artifact with exactly this content, if any.

        Recipes return checkpoint folders inside their run folders; a later stage that takes such a
        folder as input links to the stored checkpoint (and so to its whole lineage) through this.
        """
        manifest = directory_manifest(Path(path))
        with self.session() as s:
            for kind in kinds:
                digest = _manifest_hash(kind, manifest)
                if s.get(Artifact, digest) is not None:
                    return digest
        return None

    def _register(
        self,
        digest: str,
        kind: str,
        final: Path,
        name: str | None,
        meta: dict[str, Any],
        tags: Iterable[str],
        parents: Iterable[tuple[str, str]],
        run_id: str | None,
    ) -> str:
        size = (
            final.stat().st_size
            if final.is_file()
            else sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
        )
        checksum = sha256_file(final) if final.is_file() else digest
        uri = str(final.relative_to(self.workspace.artifact_root))
        with self.session() as s:
            if s.get(Artifact, digest) is None:
                s.add(
                    Artifact(
                        id=digest,
                        kind=kind,
                        uri=uri,
                        bytes=size,
                        checksum=checksum,
                        name=name,
                        run_id=run_id,
                        meta=meta,
                    )
                )
                s.flush()
            for tag in set(tags):
                if s.get(ArtifactTag, (digest, tag)) is None:
                    s.add(ArtifactTag(artifact_id=digest, tag=tag))
            for parent, role in parents:
                self._add_edge(s, parent, digest, role, run_id)
        return digest

    def _file_ok(self, path: Path) -> bool:
        with self.session() as s:
            row = s.scalars(
                select(Artifact).where(Artifact.uri == str(path.relative_to(self.workspace.artifact_root)))
            )
            art = row.first()
        if art is None:  # an orphan from a crash: trust it only if it parses as Parquet
            try:
                pq.read_metadata(path)
                return path.suffix == ".parquet"
            except Exception:
                return False
        return sha256_file(path) == art.checksum

    def _dir_ok(self, path: Path, kind: str, digest: str) -> bool:
        return _manifest_hash(kind, directory_manifest(path)) == digest

    def resolve(self, ref: str) -> str:
        """Full id from an id, a unique id prefix (≥ 6 chars), an artifact name (newest wins),
        `name@vN` (the N-th version of a name, oldest = v1) or `name@tag` (the newest version with the tag)."""
        if "@" in ref:
            return self._resolve_version(ref)
        with self.session() as s:
            if s.get(Artifact, ref) is not None:
                return ref
            if len(ref) >= 6:
                ids = s.scalars(select(Artifact.id).where(Artifact.id.like(f"{ref}%")).limit(2)).all()
                if len(ids) == 1:
                    return ids[0]
                if len(ids) > 1:
                    raise StoreError(f"artifact id prefix {ref!r} is ambiguous")
            named = s.scalars(
                select(Artifact.id).where(Artifact.name == ref).order_by(Artifact.created_at.desc())
            ).first()
            if named:
                return named
        raise StoreError(f"no artifact {ref!r} in {self.workspace.home}")

    def _resolve_version(self, ref: str) -> str:
        name, _, selector = ref.rpartition("@")
        with self.session() as s:
            ids = s.scalars(
                select(Artifact.id).where(Artifact.name == name).order_by(Artifact.created_at, Artifact.id)
            ).all()
            if not ids:
                raise StoreError(f"no artifact named {name!r} (from {ref!r}) in {self.workspace.home}")
            if selector[:1] == "v" and selector[1:].isdigit():
                n = int(selector[1:])
                if not 1 <= n <= len(ids):
                    raise StoreError(f"{ref!r}: {name!r} has versions v1..v{len(ids)}")
                return ids[n - 1]
            tagged = set(s.scalars(select(ArtifactTag.artifact_id).where(ArtifactTag.tag == selector)).all())
        for aid in reversed(ids):
            if aid in tagged:
                return aid
        raise StoreError(f"{ref!r}: no version of {name!r} has the tag {selector!r}")

    def get(self, ref: str) -> ArtifactInfo:
        aid = self.resolve(ref)
        with self.session() as s:
            art = s.get(Artifact, aid)
            tags = s.scalars(select(ArtifactTag.tag).where(ArtifactTag.artifact_id == aid)).all()
            return _info(art, tags)

    def path(self, ref: str, verify: bool = True) -> Path:
        """Local path of an artifact, its hash checked first (IntegrityError names the file)."""
        info = self.get(ref)
        p = self.workspace.artifact_root / info.uri
        if not p.exists():
            raise IntegrityError(
                f"{p}: artifact {info.id[:12]} ({info.kind}) is missing from the artifact root"
            )
        if verify:
            actual = sha256_file(p) if p.is_file() else _manifest_hash(info.kind, directory_manifest(p))
            if actual != info.checksum:
                raise IntegrityError(
                    f"{p}: content does not match the recorded hash of artifact {info.id[:12]} "
                    f"(expected {info.checksum[:12]}, found {actual[:12]}); the file was modified or corrupted"
                )
        return p

    def read_dataset(self, ref: str, verify: bool = True) -> pa.Table:
        # Read from the path, never from an in-memory buffer: pyarrow 26 aborts the process at exit
        # ("terminate called without an active exception") in about 1 run in 6 after a buffered read.
        return pq.read_table(self.path(ref, verify=verify))

    def find(
        self,
        kind: str | None = None,
        tags: Iterable[str] = (),
        name: str | None = None,
        limit: int | None = None,
    ) -> list[ArtifactInfo]:
        """Artifacts of a kind having all the given tags, newest first."""
        tags = list(tags)
        with self.session() as s:
            q = select(Artifact).order_by(Artifact.created_at.desc())
            if kind:
                q = q.where(Artifact.kind == kind)
            if name:
                q = q.where(Artifact.name == name)
            for tag in tags:
                q = q.where(Artifact.id.in_(select(ArtifactTag.artifact_id).where(ArtifactTag.tag == tag)))
            if limit:
                q = q.limit(limit)
            arts = s.scalars(q).all()
            tag_rows = s.execute(
                select(ArtifactTag.artifact_id, ArtifactTag.tag).where(
                    ArtifactTag.artifact_id.in_([a.id for a in arts])
                )
            ).all()
        by_id: dict[str, list[str]] = {}
        for aid, tag in tag_rows:
            by_id.setdefault(aid, []).append(tag)
        return [_info(a, by_id.get(a.id, [])) for a in arts]

    # ------------------------------------------------------------------ lineage

    def add_edge(self, parent: str, child: str, role: str, run_id: str | None = None) -> None:
        with self.session() as s:
            self._add_edge(s, parent, child, role, run_id)

    def _add_edge(self, s: Session, parent: str, child: str, role: str, run_id: str | None) -> None:
        if parent == child:
            raise StoreError(f"artifact {parent[:12]} cannot be its own {role}")
        if s.get(Artifact, parent) is None:
            raise StoreError(f"lineage edge {role}: parent artifact {parent!r} does not exist")
        if s.get(LineageEdge, (parent, child, role)) is None:
            s.add(LineageEdge(parent_id=parent, child_id=child, role=role, run_id=run_id))

    def lineage(
        self, ref: str, direction: Literal["up", "down"] = "up", max_depth: int | None = None
    ) -> LineageGraph:
        """Every ancestor (`up`) or descendant (`down`) of an artifact, with the edges between them.

        One recursive CTE, the same SQL on SQLite and PostgreSQL.
        """
        if direction not in ("up", "down"):
            raise StoreError(f"lineage direction must be 'up' or 'down', got {direction!r}")
        root = self.resolve(ref)
        near, far = ("child_id", "parent_id") if direction == "up" else ("parent_id", "child_id")
        near_col, far_col = getattr(LineageEdge, near), getattr(LineageEdge, far)
        graph = LineageGraph(root=root, direction=direction)
        with self.session() as s:
            if max_depth is None:
                # Deduplicating on the id alone keeps the recursion linear in the graph size
                # (carrying a depth column makes SQLite revisit every path: 400x slower here).
                sql = text(
                    f"WITH RECURSIVE g(id) AS (SELECT CAST(:root AS VARCHAR(64)) UNION "
                    f"SELECT e.{far} FROM lineage_edges e JOIN g ON e.{near} = g.id) SELECT id FROM g"
                )
                ids = set(s.scalars(sql, {"root": root}).all())
            else:
                ids, frontier = {root}, [root]
                for _ in range(max(0, max_depth)):
                    nxt: set[str] = set()
                    for chunk in _chunks(frontier):
                        nxt.update(s.scalars(select(far_col).where(near_col.in_(chunk))).all())
                    frontier = sorted(nxt - ids)
                    ids |= nxt
                    if not frontier:
                        break
            edges: list[tuple[str, str, str]] = []
            arts: list[Artifact] = []
            size = 900 if self.workspace.is_sqlite else 50_000
            for chunk in _chunks(sorted(ids), size):
                rows = s.execute(
                    select(LineageEdge.parent_id, LineageEdge.child_id, LineageEdge.role).where(
                        near_col.in_(chunk)
                    )
                ).all()
                edges += [(p, c, r) for p, c, r in rows if (p if direction == "up" else c) in ids]
                arts += s.scalars(select(Artifact).where(Artifact.id.in_(chunk))).all()
        graph.edges = sorted(edges)
        graph.nodes = {a.id: _info(a, ()) for a in arts}
        return graph

    # ------------------------------------------------------------------ runs and metrics

    def start_run(
        self,
        stage: str,
        config: Mapping[str, Any] | None = None,
        name: str | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
    ) -> str:
        rid = run_id or f"{stage}-{utcnow():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        with self.session() as s:
            existing = s.get(Run, rid)
            if existing is not None:  # a resumed run keeps its id and history
                existing.status = "running"
                existing.ended_at = None
                return rid
            s.add(
                Run(
                    id=rid,
                    stage=stage,
                    name=name,
                    config=dict(config or {}),
                    code_version=code_version(),
                    host=f"{getpass.getuser()}@{socket.gethostname()}",
                    run_dir=str(run_dir) if run_dir else None,
                )
            )
        return rid

    def log_metrics(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        now = utcnow()
        with self.session() as s:
            s.add_all(
                Metric(run_id=run_id, step=step, name=k, value=float(v), time=now)
                for k, v in metrics.items()
                if v is not None
            )

    def finish_run(
        self, run_id: str, status: str = "finished", summary: Mapping[str, Any] | None = None
    ) -> None:
        if status not in ("finished", "failed", "stopped"):
            raise StoreError(f"run status must be finished, failed or stopped, got {status!r}")
        with self.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise StoreError(f"no run {run_id!r}")
            run.status = status
            run.ended_at = utcnow()
            if summary:
                run.summary = {**(run.summary or {}), **dict(summary)}

    def get_run(self, run_id: str) -> Run:
        with self.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise StoreError(f"no run {run_id!r}")
            return run

    def runs(self, stage: str | None = None, limit: int = 50) -> list[Run]:
        with self.session() as s:
            q = select(Run).order_by(Run.started_at.desc()).limit(limit)
            if stage:
                q = q.where(Run.stage == stage)
            return list(s.scalars(q).all())

    def metrics(self, run_id: str, name: str | None = None) -> list[tuple[int, str, float]]:
        with self.session() as s:
            q = select(Metric.step, Metric.name, Metric.value).where(Metric.run_id == run_id)
            if name:
                q = q.where(Metric.name == name)
            return [tuple(r) for r in s.execute(q.order_by(Metric.step, Metric.id)).all()]  # type: ignore[misc]

    # ------------------------------------------------------------------ alerts

    def add_alert(
        self,
        run_id: str,
        step: int,
        rule: str,
        severity: str,
        metric: str,
        value: float | None,
        threshold: float | None,
        message: str,
        actions: Iterable[str] = (),
    ) -> int:
        """Record an alert that fired at `step` of run `run_id`; returns the row id."""
        if severity not in ("info", "warning", "critical"):
            raise StoreError(f"alert severity must be info, warning or critical, got {severity!r}")
        with self.session() as s:
            if s.get(Run, run_id) is None:
                raise StoreError(f"alert {rule!r} at step {step}: no run {run_id!r}")
            row = Alert(
                run_id=run_id,
                step=int(step),
                rule=rule,
                severity=severity,
                metric=metric,
                value=_finite_or_none(value),
                threshold=_finite_or_none(threshold),
                message=message,
                actions=list(actions),
            )
            s.add(row)
            s.flush()
            return int(row.id)

    def alerts(
        self, run_id: str | None = None, min_severity: str | None = None, limit: int | None = None
    ) -> list[AlertRecord]:
        """Alerts of one run by step, or of every run in the order they were recorded.

        `min_severity` keeps that level and the ones above it (warning: warning and critical)."""
        order = ("info", "warning", "critical")
        if min_severity is not None and min_severity not in order:
            raise StoreError(f"min_severity must be info, warning or critical, got {min_severity!r}")
        with self.session() as s:
            q = select(Alert)
            if run_id is not None:
                q = q.where(Alert.run_id == run_id).order_by(Alert.step, Alert.id)
            else:
                q = q.order_by(Alert.id)
            if min_severity is not None:
                q = q.where(Alert.severity.in_(order[order.index(min_severity) :]))
            if limit:
                q = q.limit(limit)
            rows = s.scalars(q).all()
            return [
                AlertRecord(
                    id=r.id,
                    run_id=r.run_id,
                    step=r.step,
                    rule=r.rule,
                    severity=r.severity,
                    metric=r.metric,
                    value=r.value,
                    threshold=r.threshold,
                    message=r.message,
                    actions=tuple(r.actions or ()),
                    created_at=r.created_at,
                )
                for r in rows
            ]


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _chunks(ids: Sequence[str], size: int = 900) -> Iterator[Sequence[str]]:
    """Slices under SQLite's bound-parameter limit."""
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


def _info(a: Artifact, tags: Iterable[str]) -> ArtifactInfo:
    return ArtifactInfo(
        id=a.id,
        kind=a.kind,
        uri=a.uri,
        bytes=a.bytes,
        checksum=a.checksum,
        created_at=a.created_at,
        name=a.name,
        run_id=a.run_id,
        meta=dict(a.meta or {}),
        tags=tuple(sorted(tags)),
    )

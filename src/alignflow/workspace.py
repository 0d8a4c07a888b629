"""The workspace: one folder holding the metadata database and the artifact root.

Default location `./alignflow-workspace`, overridden by `ALIGNFLOW_HOME`. `ALIGNFLOW_DB_URL`
selects another database (PostgreSQL) while artifacts stay under the workspace folder.

Writers stage bytes under `artifacts/tmp/` before renaming them into place. A writer that is
killed leaves its staging file behind; `collect_tmp` removes such orphans (when the store opens,
and from `alignflow workspace gc`). A staging name records its writer, `<pid>-<host>-<random>`,
so a file whose writer has exited on this host is an orphan at once; a file written from another
host, or by an older alignflow without the writer in its name, is one only when it has not
changed for `TMP_MAX_AGE_S`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "alignflow-workspace"
TMP_MAX_AGE_S = 3600.0
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TMP_NAME = re.compile(r"(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]{32}(\.\w+)?")


@dataclass(frozen=True)
class TmpEntry:
    """One staging file or folder under `artifacts/tmp/`, and why it is (or is not) an orphan."""

    path: Path
    bytes: int
    age_s: float  # since anything in it last changed
    orphan: bool
    reason: str


@dataclass(frozen=True)
class Workspace:
    home: Path
    db_url: str

    @classmethod
    def from_env(cls, home: str | os.PathLike[str] | None = None, db_url: str | None = None) -> Workspace:
        root = Path(home or os.environ.get("ALIGNFLOW_HOME") or DEFAULT_HOME).expanduser().resolve()
        url = db_url or os.environ.get("ALIGNFLOW_DB_URL") or f"sqlite:///{root / 'alignflow.db'}"
        return cls(home=root, db_url=url)

    @property
    def artifact_root(self) -> Path:
        return self.home / "artifacts"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    @property
    def tmp_dir(self) -> Path:
        return self.artifact_root / "tmp"

    def ensure_dirs(self) -> None:
        for d in (self.home, self.artifact_root, self.tmp_dir, self.runs_dir, self.reports_dir):
            d.mkdir(parents=True, exist_ok=True)

    def new_tmp_path(self, suffix: str = ".part") -> Path:
        """A fresh staging path naming this process as its writer (the folder is created)."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir / f"{os.getpid()}-{_HOST}-{uuid.uuid4().hex}{suffix}"

    def scan_tmp(self, max_age_s: float = TMP_MAX_AGE_S) -> list[TmpEntry]:
        """Every entry of the staging folder, oldest first, each marked orphan or not."""
        if not self.tmp_dir.is_dir():
            return []
        now = time.time()
        entries = []
        for path in self.tmp_dir.iterdir():
            try:
                size, changed = _size_and_last_change(path)
            except FileNotFoundError:  # its writer renamed or removed it just now
                continue
            age = max(0.0, now - changed)
            orphan, reason = _orphan(path.name, age, max_age_s)
            entries.append(TmpEntry(path=path, bytes=size, age_s=age, orphan=orphan, reason=reason))
        return sorted(entries, key=lambda e: -e.age_s)

    def collect_tmp(self, max_age_s: float = TMP_MAX_AGE_S, dry_run: bool = False) -> list[TmpEntry]:
        """Remove orphaned staging files and folders (see the module docstring); return what was removed.

        With `dry_run`, remove nothing and return what would be removed.
        """
        removed = []
        for entry in self.scan_tmp(max_age_s):
            if not entry.orphan:
                continue
            if not dry_run:
                try:
                    if entry.path.is_dir() and not entry.path.is_symlink():
                        shutil.rmtree(entry.path)
                    else:
                        entry.path.unlink()
                except FileNotFoundError:  # another process collected it first
                    continue
            removed.append(entry)
        return removed


def _size_and_last_change(path: Path) -> tuple[int, float]:
    # ctime, not mtime: copying a folder (shutil.copytree) stamps the copies with the source's old
    # mtimes, but every write and every stamping moves the ctime to now.
    st = path.lstat()
    is_dir = path.is_dir() and not path.is_symlink()
    size, changed = 0 if is_dir else st.st_size, max(st.st_mtime, st.st_ctime)
    if is_dir:
        for sub in path.rglob("*"):
            try:
                sst = sub.lstat()
            except FileNotFoundError:
                continue
            size += sst.st_size if sub.is_file() else 0
            changed = max(changed, sst.st_mtime, sst.st_ctime)
    return size, changed


def _orphan(name: str, age_s: float, max_age_s: float) -> tuple[bool, str]:
    m = _TMP_NAME.fullmatch(name)
    if m and m["host"] == _HOST:
        pid = int(m["pid"])
        if _pid_alive(pid):
            return False, f"its writer (process {pid}) is running"
        return True, f"its writer (process {pid}) has exited"
    why = "written on another host" if m else "no writer recorded in its name"
    if age_s > max_age_s:
        return True, f"unchanged for {_duration(age_s)} ({why})"
    return False, f"changed {_duration(age_s)} ago ({why}); kept until {_duration(max_age_s)} old"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

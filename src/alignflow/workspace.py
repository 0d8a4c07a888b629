"""The workspace: one folder holding the metadata database and the artifact root.

Default location `./alignflow-workspace`, overridden by `ALIGNFLOW_HOME`. `ALIGNFLOW_DB_URL`
selects another database (PostgreSQL) while artifacts stay under the workspace folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "alignflow-workspace"


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

    def ensure_dirs(self) -> None:
        for d in (self.home, self.artifact_root, self.artifact_root / "tmp", self.runs_dir, self.reports_dir):
            d.mkdir(parents=True, exist_ok=True)

"""An on-disk cache of judge replies, so that re-running a judged dataset costs no requests.

A key is the SHA-256 of a canonical JSON (sorted keys, no whitespace) of whatever identifies a reply: for an
OpenAI-compatible endpoint, ``(backend, model, request body)`` — the body holds the rendered template, so the
template text, the prompt and the candidates are all part of the key. Each entry is one JSON file,
``ROOT/ab/abcdef….json``, written to a temporary file and renamed into place, so concurrent threads and
processes never see half an entry; an entry that does not parse (a crash mid-write on a filesystem without
atomic rename, a hand edit) counts as a miss and is rewritten on the next put.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_key(parts: dict[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of ``parts`` (which must be JSON-serialisable)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ReplyCache:
    """``get(key) -> dict | None`` and ``put(key, value)`` over one JSON file per key under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            value = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing, unreadable or corrupt: a miss
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(value, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("??/*.json")) if self.root.is_dir() else 0

"""Gateway API keys: created, listed, revoked and verified over `serving_api_keys` (`models.ServingApiKey`).

A key is shown once, when it is created; the table keeps only its SHA-256 (a key is 32 random bytes, so a
fast unsalted hash is enough: nobody can brute-force the preimage, unlike a password).

Rate limits are a token bucket per key, held in memory by each server process: a key of N requests per
minute may burst N requests and then gets one more every 60/N seconds. With several worker processes each
keeps its own buckets, so the effective limit is N per process; the gateway runs one process by default.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from alignflow.errors import AlignflowError
from alignflow.serving.models import ServingApiKey
from alignflow.store.models import utcnow

KEY_PREFIX = "afk-"


class ApiKeyError(AlignflowError):
    """A key command named a key that does not exist, or gave an invalid value."""


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def create_key(s: Session, name: str, rate_per_minute: int | None = None) -> tuple[ServingApiKey, str]:
    """Store a new key under `name`; returns (row, raw key). The raw key is never stored."""
    name = name.strip()
    if not name or len(name) > 64:
        raise ApiKeyError(f"key name: expected 1-64 characters, got {name!r}")
    if rate_per_minute is not None and rate_per_minute < 1:
        raise ApiKeyError(f"--rate: expected a positive number of requests per minute, got {rate_per_minute}")
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ServingApiKey(name=name, key_hash=hash_key(raw), rate_per_minute=rate_per_minute)
    s.add(row)
    s.commit()
    return row, raw


def list_keys(s: Session, include_revoked: bool = True) -> list[ServingApiKey]:
    q = select(ServingApiKey).order_by(ServingApiKey.id)
    if not include_revoked:
        q = q.where(ServingApiKey.revoked_at.is_(None))
    return list(s.scalars(q))


def revoke_key(s: Session, key_id: int) -> ServingApiKey:
    row = s.get(ServingApiKey, key_id)
    if row is None:
        raise ApiKeyError(f"no API key with id {key_id} (see `alignflow deploy keys list`)")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        s.commit()
    return row


def verify_key(s: Session, raw: str) -> ServingApiKey | None:
    """The live key row whose hash matches `raw`, else None (unknown and revoked keys look the same)."""
    row = s.scalar(select(ServingApiKey).where(ServingApiKey.key_hash == hash_key(raw)))
    if row is None or row.revoked_at is not None:
        return None
    return row


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token buckets per key id, in this process's memory (see the module docstring).

    `acquire` takes one token and returns 0, or, when the bucket is empty, takes nothing and returns the
    seconds until a token is available (the `retry-after` of the 429).
    """

    def __init__(self, default_per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.default_per_minute = default_per_minute
        self._clock = clock
        self._buckets: dict[int, _Bucket] = {}
        self._lock = threading.Lock()

    def rate_for(self, per_minute: int | None) -> int:
        return per_minute or self.default_per_minute

    def acquire(self, key_id: int, per_minute: int | None) -> float:
        rate = self.rate_for(per_minute)
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                bucket = self._buckets[key_id] = _Bucket(tokens=float(rate), stamp=now)
            bucket.tokens = min(float(rate), bucket.tokens + (now - bucket.stamp) * rate / 60.0)
            bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) * 60.0 / rate

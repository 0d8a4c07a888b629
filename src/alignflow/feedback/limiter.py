"""Login limits: counted before the password hash and atomically, per client address and per account.

The policy (every number is a constant below; `configure` installs other numbers, e.g. short windows in tests):

1. Count first. An attempt may reach the password hash only after a transaction has checked the limits and
   recorded it as a 'pending' row of `fb_login_attempts`, under one lock (SQLite: `BEGIN IMMEDIATE`, the database
   write lock; PostgreSQL: a transaction-scoped advisory lock, so it holds across server processes), and
   committed. A pending attempt counts as a failure until it is settled, so N parallel guesses see each other and
   at most the allowed number are hashed. Refused attempts (429) are not recorded and cost no hash.
2. Per address: at most `ADDR_MAX_FAILURES` failed or pending attempts from one client address within
   `ADDR_WINDOW_S`, whatever the usernames; beyond that every login from that address is refused, the right
   password included, until its failures age out.
3. Per account, exponential backoff: the first `ACCOUNT_FREE_FAILURES` failures within `ACCOUNT_WINDOW_S` are
   free; with n >= that many, the account takes its next attempt only
   `min(BACKOFF_BASE_S * 2 ** (n - ACCOUNT_FREE_FAILURES), BACKOFF_MAX_S)` seconds after the latest counted one
   (10 s, 20 s, 40 s, ... up to 10 minutes). Refused attempts do not count, so hammering does not lengthen it.
4. Trusted addresses: from an address where the account logged in successfully within `TRUST_S`, n counts only
   that address's own failures on the account. A successful login forgets that address's failures on it.
5. Hash slots: at most `HASH_SLOTS` password hashes run at once per server process (each takes 64 MiB and a
   good part of a CPU-second with argon2-cffi's defaults; `ALIGNFLOW_LOGIN_HASH_SLOTS` sets the number); a login
   that gets no slot within `HASH_WAIT_S` is refused (429) and its pending row dropped, so a flood never queues
   unbounded work. With W workers at most W * HASH_SLOTS hashes run.

Why guessing stays slow: one address gets `ADDR_MAX_FAILURES` guesses per `ADDR_WINDOW_S` over all accounts; one
account, from any number of untrusted addresses together, gets `ACCOUNT_FREE_FAILURES` guesses, then one per
backoff step, about 6 an hour once the step is at its cap. While the backoff runs the right password is refused
like a wrong one, so it cannot be detected early.

Why a stranger cannot lock the owner out: the account limit is a delay capped at `BACKOFF_MAX_S`, never a lock,
and it ends at most `BACKOFF_MAX_S` after the stranger's last counted guess; the owner's usual addresses (rule 4)
do not see the stranger's failures at all; rule 2 refuses only the address that failed. What a persistent
stranger can still do is compete, at the capped rate, for the account's attempts from addresses the owner never
logged in from: a new address of the owner's waits for the next free step.

The client address is the one the route passes in (`request.client.host`). uvicorn takes it from
`X-Forwarded-For` only when the peer is in `FORWARDED_ALLOW_IPS` (default: localhost); a reverse proxy on another
host must be listed there, or all its clients share its address for rule 2.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, exists, func, or_, select, text
from sqlalchemy.orm import Session

from alignflow.feedback.models import LoginAttempt
from alignflow.store.models import utcnow

ADDR_WINDOW_S = 300.0
ADDR_MAX_FAILURES = 10
ACCOUNT_WINDOW_S = 3600.0
ACCOUNT_FREE_FAILURES = 5
BACKOFF_BASE_S = 10.0
BACKOFF_MAX_S = 600.0
TRUST_S = 30 * 86400.0
HASH_WAIT_S = 2.0
HASH_SLOTS_ENV = "ALIGNFLOW_LOGIN_HASH_SLOTS"


def _hash_slots_from_env(default: int = 2) -> int:
    raw = os.environ.get(HASH_SLOTS_ENV, "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{HASH_SLOTS_ENV}: a whole number >= 1, got {raw!r}")
    return int(raw)


HASH_SLOTS = _hash_slots_from_env()
COUNTED = ("pending", "failed")
# Any fixed 64-bit number: the PostgreSQL advisory lock that every limiter transaction takes.
_PG_LOCK_KEY = 0x616C69676E666C6F


@dataclass(frozen=True)
class Policy:
    """The limiter's numbers (seconds, counts); the defaults are the module constants."""

    addr_window_s: float = ADDR_WINDOW_S
    addr_max_failures: int = ADDR_MAX_FAILURES
    account_window_s: float = ACCOUNT_WINDOW_S
    account_free_failures: int = ACCOUNT_FREE_FAILURES
    backoff_base_s: float = BACKOFF_BASE_S
    backoff_max_s: float = BACKOFF_MAX_S
    trust_s: float = TRUST_S
    hash_slots: int = HASH_SLOTS
    hash_wait_s: float = HASH_WAIT_S

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"{f.name}: must be > 0, got {getattr(self, f.name)!r}")

    def backoff_s(self, failures: int) -> float:
        """Seconds the account waits after its latest counted attempt, given `failures` counted ones."""
        if failures < self.account_free_failures:
            return 0.0
        # The exponent is capped so that a huge count cannot overflow the float.
        step = min(failures - self.account_free_failures, 40)
        return min(self.backoff_base_s * 2**step, self.backoff_max_s)


class Refused(Exception):
    """The attempt may not reach the password hash now (answer 429)."""


_policy = Policy()
_slots = threading.BoundedSemaphore(_policy.hash_slots)


def policy() -> Policy:
    return _policy


def configure(new: Policy) -> Policy:
    """Install `new` for this process; returns the previous policy (install it again to restore)."""
    global _policy, _slots
    previous, _policy = _policy, new
    if new.hash_slots != previous.hash_slots:
        # Hashes running now release the semaphore they took (see `hash_slot`), not this one.
        _slots = threading.BoundedSemaphore(new.hash_slots)
    return previous


def _lock(s: Session) -> None:
    """Begin a write transaction that serialises with every other limiter transaction."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        return
    # As `engine.begin_write` (not imported: engine imports auth, which imports this module). pysqlite
    # opens a transaction only before the first write, too late to make check-then-insert atomic.
    conn = s.connection()
    if not conn.connection.dbapi_connection.in_transaction:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _ago(t: datetime, seconds: float) -> datetime:
    return t - timedelta(seconds=seconds)


def _count(s: Session, *where: object) -> int:
    return s.scalar(select(func.count()).select_from(LoginAttempt).where(*where))


def _forget_old(s: Session, t: datetime, p: Policy) -> None:
    counted_for = max(p.addr_window_s, p.account_window_s)
    s.execute(
        delete(LoginAttempt).where(
            LoginAttempt.at < _ago(t, min(counted_for, p.trust_s)),
            or_(
                and_(LoginAttempt.status != "ok", LoginAttempt.at < _ago(t, counted_for)),
                and_(LoginAttempt.status == "ok", LoginAttempt.at < _ago(t, p.trust_s)),
            ),
        )
    )


def reserve(s: Session, username: str, client: str) -> int:
    """Check both limits and record a pending attempt, committed before the caller hashes; returns its id.

    Raises:
        Refused: the address or the account is over its limit (then nothing is recorded).
    """
    p = _policy
    _lock(s)
    t = utcnow()
    _forget_old(s, t, p)
    counted = LoginAttempt.status.in_(COUNTED)
    if _count(s, counted, LoginAttempt.client == client, LoginAttempt.at >= _ago(t, p.addr_window_s)) >= (
        p.addr_max_failures
    ):
        s.commit()
        raise Refused(f"too many failed logins from your address; try again in {p.addr_window_s:.0f} s")
    trusted = s.scalar(
        select(
            exists().where(
                LoginAttempt.username == username,
                LoginAttempt.client == client,
                LoginAttempt.status == "ok",
                LoginAttempt.at >= _ago(t, p.trust_s),
            )
        )
    )
    scope = [counted, LoginAttempt.username == username, LoginAttempt.at >= _ago(t, p.account_window_s)]
    if trusted:
        scope.append(LoginAttempt.client == client)
    wait = p.backoff_s(_count(s, *scope))
    if wait > 0 and s.scalar(select(exists().where(*scope, LoginAttempt.at > _ago(t, wait)))):
        s.commit()
        raise Refused(f"too many failed logins for this account; try again in at most {wait:.0f} s")
    row = LoginAttempt(username=username, client=client, status="pending", at=t)
    s.add(row)
    s.flush()
    attempt = row.id
    s.commit()
    return attempt


def settle(s: Session, attempt: int, succeeded: bool) -> None:
    """Record how a reserved attempt ended; runs in the caller's transaction, which the caller commits."""
    _lock(s)
    row = s.get(LoginAttempt, attempt, populate_existing=True)
    if row is None:  # forgotten meanwhile: older than every window, so it no longer counts anyway
        return
    if not succeeded:
        row.status = "failed"
        return
    s.execute(
        delete(LoginAttempt).where(
            LoginAttempt.username == row.username,
            LoginAttempt.client == row.client,
            LoginAttempt.status.in_(("failed", "ok")),
        )
    )
    row.status = "ok"
    row.at = utcnow()


def drop(s: Session, attempt: int) -> None:
    """Forget a reserved attempt that never reached the hash (no slot); commits."""
    _lock(s)
    s.execute(delete(LoginAttempt).where(LoginAttempt.id == attempt))
    s.commit()


@contextlib.contextmanager
def hash_slot() -> Iterator[None]:
    """Hold one of the process's `hash_slots` while hashing.

    Raises:
        Refused: no slot freed up within `hash_wait_s`.
    """
    slots = _slots
    if not slots.acquire(timeout=_policy.hash_wait_s):
        raise Refused("the server is busy with other logins; try again in a few seconds")
    try:
        yield
    finally:
        slots.release()

"""The login limiter under parallel clients, against a real uvicorn server on 127.0.0.1, on SQLite and PostgreSQL.

Clients connect from distinct loopback addresses (Linux routes all of 127.0.0.0/8 to `lo`), so the server sees
different client addresses. `auth.verify_password` is wrapped to count the hashes that ran and the most that ran
at once; the wrapper also sleeps, standing in for the 64 MiB argon2 cost that the tests' cheap parameters lack,
so that parallel requests really overlap while hashing.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import uvicorn
from alembic import command
from fb_helpers import PASSWORD, make_users
from sqlalchemy import func, select, text

from alignflow.feedback import auth, limiter
from alignflow.feedback.app import create_app
from alignflow.feedback.models import LoginAttempt
from alignflow.store import db

WRONG = "wrong-password"
STRANGER, OWNER_HOME, OWNER_NEW, SPRAYER = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"


class HashMeter:
    """Counts `verify_password` calls, and the peak of calls running at the same time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
        self.seconds = seconds
        self.ran = self.running = self.peak = 0
        self._lock = threading.Lock()
        original = auth.verify_password

        def counted(stored_hash: str, password: str) -> bool:
            with self._lock:
                self.ran += 1
                self.running += 1
                self.peak = max(self.peak, self.running)
            try:
                time.sleep(self.seconds)
                return original(stored_hash, password)
            finally:
                with self._lock:
                    self.running -= 1

        monkeypatch.setattr(auth, "verify_password", counted)


@pytest.fixture
def meter(monkeypatch: pytest.MonkeyPatch) -> HashMeter:
    return HashMeter(monkeypatch, seconds=0.05)


@pytest.fixture
def policy() -> Iterator[Callable[..., limiter.Policy]]:
    """`policy(**changes)` installs the default policy with `changes`; the previous one is restored after."""
    previous: list[limiter.Policy] = []

    def install(**changes: float) -> limiter.Policy:
        new = dataclasses.replace(limiter.Policy(), **changes)
        old = limiter.configure(new)
        if not previous:
            previous.append(old)
        return new

    yield install
    if previous:
        limiter.configure(previous[0])


@pytest.fixture
def server(workspace, s) -> Iterator[str]:
    """The app served by uvicorn on 127.0.0.1 in a thread of this process; yields its base URL."""
    make_users(s, {"owner": "annotator", "other": "annotator"})
    app = create_app(workspace)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(15)
    app.state.sessions.kw["bind"].dispose()


def login(base: str, username: str, password: str, source: str) -> int:
    """POST the API login from the loopback address `source`; returns the status code."""
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=60) as c:
        return c.post(
            f"{base}/api/v1/auth/login", json={"username": username, "password": password}
        ).status_code


def in_parallel(calls: list[Callable[[], int]]) -> list[int]:
    """Run every call in its own thread, all released at once."""
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], int]) -> int:
        start.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def rows(s, **where: str) -> int:
    s.rollback()  # read what the server committed, not an older snapshot
    q = select(func.count()).select_from(LoginAttempt)
    for column, value in where.items():
        q = q.where(getattr(LoginAttempt, column) == value)
    return s.scalar(q)


@pytest.mark.parametrize("spread", ["one address", "50 addresses"])
def test_50_parallel_guesses_for_one_account(server, meter, s, spread):
    sources = [STRANGER] * 50 if spread == "one address" else [f"127.0.1.{k + 1}" for k in range(50)]
    codes = in_parallel([lambda src=src: login(server, "owner", WRONG, src) for src in sources])
    counts = Counter(codes)
    print(
        f"\n50 parallel guesses ({spread}): 401={counts[401]} 429={counts[429]} hashes={meter.ran} "
        f"peak concurrent hashes={meter.peak} (slots {limiter.policy().hash_slots})"
    )
    # Counted before hashing, atomically: only the free failures reach the hash, however many race.
    free = limiter.ACCOUNT_FREE_FAILURES
    assert counts == {401: free, 429: 50 - free}
    assert meter.ran == free
    assert meter.peak <= limiter.policy().hash_slots
    assert rows(s, username="owner", status="failed") == free and rows(s, status="pending") == 0


def test_one_address_spraying_many_usernames_is_limited(server, meter, s):
    names = [f"user{k:02d}" for k in range(12)]
    make_users(s, {name: "annotator" for name in names})
    codes = in_parallel([lambda n=n: login(server, n, WRONG, SPRAYER) for n in names])
    cap = limiter.ADDR_MAX_FAILURES
    assert Counter(codes) == {401: cap, 429: len(names) - cap}
    assert meter.ran == cap
    # The address is refused even with a right password; another address is not affected.
    assert login(server, "other", PASSWORD, SPRAYER) == 429
    assert login(server, "other", PASSWORD, OWNER_HOME) == 200


def test_a_stranger_cannot_lock_the_owner_out(server, meter, policy, s):
    # 6 s leaves room for slow logins on a loaded machine: if the hammering below were counted, the backoff
    # would restart at >= guessed + backoff/2 and refuse until >= guessed + 1.5 * backoff, past the margin.
    backoff = 6.0
    policy(backoff_base_s=backoff, backoff_max_s=backoff)
    assert login(server, "owner", PASSWORD, OWNER_HOME) == 200  # the owner's usual address is now trusted
    codes = in_parallel([lambda: login(server, "owner", WRONG, STRANGER)] * 20)
    guessed = time.monotonic()
    assert Counter(codes) == {401: limiter.ACCOUNT_FREE_FAILURES, 429: 20 - limiter.ACCOUNT_FREE_FAILURES}
    # While the backoff runs a right password is refused like a wrong one, so it cannot be found early ...
    assert login(server, "owner", PASSWORD, STRANGER) == 429
    # ... but the owner's trusted address does not see the stranger's failures,
    assert login(server, "owner", PASSWORD, OWNER_HOME) == 200
    # and a new address of the owner's waits only for the backoff: the stranger's refused hammering in the
    # meantime is not counted, so it does not lengthen it.
    assert login(server, "owner", PASSWORD, OWNER_NEW) == 429
    while time.monotonic() - guessed < backoff / 2:
        assert login(server, "owner", WRONG, STRANGER) == 429
        time.sleep(0.05)
    hashes_before = meter.ran
    while (code := login(server, "owner", PASSWORD, OWNER_NEW)) == 429:
        assert time.monotonic() - guessed < backoff + backoff / 2 - 0.5, (
            "the owner was still refused after the backoff"
        )
        time.sleep(0.1)
    assert code == 200 and meter.ran == hashes_before + 1


def test_hash_slots_cap_concurrent_hashes(server, meter, policy, s):
    policy(hash_slots=2, hash_wait_s=0.3)
    meter.seconds = 0.3
    names = [f"user{k:02d}" for k in range(20)]
    make_users(s, {name: "annotator" for name in names})
    codes = in_parallel(
        [lambda k=k, n=n: login(server, n, PASSWORD, f"127.0.2.{k + 1}") for k, n in enumerate(names)]
    )
    counts = Counter(codes)
    print(f"\n20 parallel right passwords, 2 slots: 200={counts[200]} 429={counts[429]} peak={meter.peak}")
    assert set(counts) == {200, 429}
    assert meter.peak == 2 and meter.ran == counts[200]
    # A login refused for want of a slot never hashed and is not held against anyone.
    assert rows(s, status="pending") == 0 and rows(s, status="failed") == 0
    refused = [n for n, code in zip(names, codes, strict=True) if code == 429]
    meter.seconds = 0.0
    assert login(server, refused[0], PASSWORD, "127.0.2.1") == 200


def test_account_backoff_doubles_up_to_its_cap(s, policy, monkeypatch):
    # The limiter's clock, moved by hand: the backoffs are seconds, and waiting them out cost 5 s a database.
    now = [limiter.utcnow()]
    monkeypatch.setattr(limiter, "utcnow", lambda: now[0])

    def sleep(seconds: float) -> None:
        now[0] += timedelta(seconds=seconds)

    make_users(s, {"owner": "annotator"})
    policy(backoff_base_s=1.0, backoff_max_s=2.0)

    def attempt(password: str) -> int:
        try:
            auth.login(s, "owner", password, "10.0.0.1")
        except auth.AuthError as exc:
            return 429 if exc.rate_limited else 401
        return 200

    assert [attempt(WRONG) for _ in range(limiter.ACCOUNT_FREE_FAILURES)] == [401] * 5
    assert attempt(PASSWORD) == 429  # 5 failures: 1 s backoff
    sleep(1.05)
    assert attempt(WRONG) == 401  # 6 failures: 2 s backoff
    sleep(1.05)
    assert attempt(WRONG) == 429
    sleep(1.0)
    assert attempt(WRONG) == 401  # 7 failures: 4 s, capped at 2 s
    sleep(2.05)
    assert attempt(PASSWORD) == 200
    # The success forgot this address's failures on the account.
    assert rows(s, username="owner", status="failed") == 0 and rows(s, username="owner", status="ok") == 1


def test_impossible_usernames_are_refused_without_a_hash_or_a_row(server, meter, s):
    with httpx.Client(base_url=server, timeout=30) as c:
        # Written out by hand: a JSON encoder would refuse the lone surrogate before sending it.
        for name in ["a\\u0000b", "x" * 65, "\\ud800", ""]:
            body = f'{{"username": "{name}", "password": "{PASSWORD}"}}'
            r = c.post("/api/v1/auth/login", content=body, headers={"content-type": "application/json"})
            assert r.status_code in (401, 422), (name, r.status_code)
        c.get("/login")
        csrf = c.cookies["af_login_csrf"]
        r = c.post("/login", data={"username": "a\x00b", "password": PASSWORD, "login_csrf": csrf})
        assert r.status_code == 401
    assert meter.ran == 0 and rows(s) == 0


def test_migration_0003_keeps_old_attempts_as_failures(db_url):
    eng = db.make_engine(db_url)
    cfg = db.alembic_config(db_url)
    with eng.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0002")
    with eng.begin() as conn:
        conn.execute(
            text("INSERT INTO fb_login_attempts (username, client, at) VALUES ('owner', '10.0.0.1', :at)"),
            {"at": datetime.now(UTC)},
        )
    db.upgrade(eng)
    assert db.current_revision(eng) == db.head_revision()  # 0003 or later
    with eng.connect() as conn:
        assert conn.execute(text("SELECT status FROM fb_login_attempts")).scalars().all() == ["failed"]
    eng.dispose()


def test_hash_slots_come_from_the_environment():
    def slots(value: str) -> subprocess.CompletedProcess:
        code = "from alignflow.feedback import limiter; print(limiter.policy().hash_slots)"
        env = {**os.environ, limiter.HASH_SLOTS_ENV: value}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)

    assert slots("3").stdout.strip() == "3"
    bad = slots("0")
    assert bad.returncode != 0 and "ALIGNFLOW_LOGIN_HASH_SLOTS: a whole number >= 1, got '0'" in bad.stderr

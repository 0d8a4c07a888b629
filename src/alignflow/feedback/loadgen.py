"""A bounded loopback load generator and crash harness for the annotation server.

Simulated annotators (asyncio tasks, one HTTP client and API token each) loop "next task" -> "submit" against a
server on 127.0.0.1. A submission is retried with the SAME client id after a connection failure, as a real
client would, so a server killed between commit and reply must still store it exactly once. Every loop is
bounded in requests and in time. `ServerProcess` runs `alignflow serve` as a subprocess that can be SIGKILLed and
restarted. Used by tests/feedback/test_crash.py and benchmarks/bench_annotation.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class LoadResult:
    acked: list[tuple[str, str, str]] = field(default_factory=list)  # (token owner, assignment id, client id)
    next_latency_s: list[float] = field(default_factory=list)
    submit_latency_s: list[float] = field(default_factory=list)
    connection_errors: int = 0
    http_errors: dict[int, int] = field(default_factory=dict)
    requests: int = 0
    no_task: int = 0


def percentiles(values: list[float], qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles in milliseconds; None when there are no values."""
    if not values:
        return {f"p{int(q)}": None for q in qs}
    v = sorted(values)
    return {f"p{int(q)}": 1000 * v[min(len(v) - 1, max(0, int(round(q / 100 * len(v))) - 1))] for q in qs}


def _answer(task: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    spec = task["schema"]
    if spec["kind"] == "ranking":
        order = list(range(len(task["candidates"])))
        rng.shuffle(order)
        return {
            "schema_version": task["schema_version"],
            "ranking": order,
            "rationale": "x" * spec["rationale_min_chars"],
        }
    choices = ["left", "right", "tie"] if spec["allow_tie"] else ["left", "right"]
    choice = rng.choice(choices)
    return {
        "schema_version": task["schema_version"],
        "choice": choice,
        "strength": None if choice == "tie" else rng.randint(1, 3),
        "dimensions": {d: rng.choice(choices) for d in spec["dimensions"]},
        "rationale": "simulated rationale " + "x" * spec["rationale_min_chars"],
        "duration_s": round(rng.uniform(2, 30), 2),
    }


async def _annotator(
    base: str,
    token: str,
    owner: str,
    project: str,
    deadline: float,
    max_requests: int,
    result: LoadResult,
    seed: int,
    think_s: float = 0.0,
    stop: threading.Event | None = None,
) -> None:
    import httpx

    def running() -> bool:
        return (
            time.monotonic() < deadline and sent < max_requests and not (stop is not None and stop.is_set())
        )

    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    sent = 0
    if think_s > 0:
        # People do not all click at the same instant: stagger the first request over one think time.
        await asyncio.sleep(rng.uniform(0, think_s))
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=httpx.Timeout(10.0)) as client:
        while running():
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await client.post(f"/api/v1/projects/{project}/next")
            except httpx.TransportError:
                result.connection_errors += 1
                await asyncio.sleep(0.2)
                continue
            result.requests += 1
            if r.status_code == 204:
                result.no_task += 1
                await asyncio.sleep(0.5)
                continue
            if r.status_code != 200:
                result.http_errors[r.status_code] = result.http_errors.get(r.status_code, 0) + 1
                await asyncio.sleep(0.2)
                continue
            result.next_latency_s.append(time.perf_counter() - t0)
            task = r.json()
            body = {"client_id": uuid.uuid4().hex, "answer": _answer(task, rng)}
            # Retry the same submission (same client id) through server restarts until the deadline.
            while running():
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"/api/v1/assignments/{task['assignment_id']}/submit", json=body)
                except httpx.TransportError:
                    result.connection_errors += 1
                    await asyncio.sleep(0.2)
                    continue
                result.requests += 1
                if 200 <= r.status_code < 300:
                    result.submit_latency_s.append(time.perf_counter() - t0)
                    result.acked.append((owner, task["assignment_id"], body["client_id"]))
                else:
                    result.http_errors[r.status_code] = result.http_errors.get(r.status_code, 0) + 1
                break
            if think_s > 0:
                # A human reads and answers between requests; uniform in [0.5, 1.5] x think_s.
                await asyncio.sleep(
                    min(rng.uniform(0.5, 1.5) * think_s, max(0.0, deadline - time.monotonic()))
                )


async def run_load(
    base_url: str,
    tokens: dict[str, str],
    project: str,
    duration_s: float,
    max_requests_per_user: int = 100_000,
    seed: int = 0,
    think_s: float = 0.0,
    result: LoadResult | None = None,
    stop: threading.Event | None = None,
) -> LoadResult:
    """Run one simulated annotator per token for `duration_s` seconds against a LOOPBACK server.

    `think_s` = 0 is a closed loop (each annotator sends its next request as soon as the last one returns);
    otherwise each annotator pauses about `think_s` seconds per task, like a person reading. Setting `stop`
    ends the run early; `result` lets another thread watch progress while it runs.
    """
    host = urlparse(base_url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"base_url: the load generator only targets loopback, got host {host!r}")
    result = result if result is not None else LoadResult()
    deadline = time.monotonic() + duration_s
    await asyncio.gather(
        *(
            _annotator(
                base_url,
                tok,
                owner,
                project,
                deadline,
                max_requests_per_user,
                result,
                seed + i,
                think_s,
                stop,
            )
            for i, (owner, tok) in enumerate(sorted(tokens.items()))
        )
    )
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`alignflow serve` on 127.0.0.1 in a subprocess, killable with SIGKILL and restartable."""

    def __init__(self, home: Path, db_url: str, port: int | None = None, workers: int = 1) -> None:
        self.home, self.db_url, self.workers = home, db_url, workers
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = open(home / f"server-{self.port}.log", "ab")  # noqa: SIM115 - closed in stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> None:
        import httpx

        env = {**os.environ, "ALIGNFLOW_HOME": str(self.home), "ALIGNFLOW_DB_URL": self.db_url}
        cmd = [sys.executable, "-m", "alignflow.cli.main", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", str(self.workers)]  # fmt: skip
        # A new session so SIGKILL can reach uvicorn's worker processes too.
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=self.log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer within {timeout_s} s; see {self.log.name}")

    def kill(self) -> None:
        """SIGKILL the server and all its workers: no shutdown handlers, no flush."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def run_with_kills(
    server: ServerProcess,
    tokens: dict[str, str],
    project: str,
    duration_s: float,
    kill_every_s: float,
    seed: int = 0,
    kills_wanted: int | None = None,
    acks_per_phase: int = 0,
) -> tuple[LoadResult, int]:
    """Run the load while SIGKILLing and restarting the server; return the load result and the number of kills.

    A phase is the time the server is up between restarts. It lasts at least `kill_every_s` seconds and until
    `acks_per_phase` submissions were acknowledged in it, so a slow machine still tests something in every
    phase (a fixed clock let a loaded machine spend a whole run restarting). With `kills_wanted` set, the run
    ends after that many kills and one more full phase; `duration_s` is then only a cap. Without it, the server
    is killed until `duration_s` runs out (the benchmark's fixed-length mode).
    """
    kills = 0
    stop = threading.Event()
    result = LoadResult()
    failure: list[BaseException] = []

    def phase_done(t0: float, acks0: int) -> bool:
        return time.monotonic() - t0 >= kill_every_s and len(result.acked) - acks0 >= acks_per_phase

    def killer() -> None:
        nonlocal kills
        try:
            while True:
                t0, acks0 = time.monotonic(), len(result.acked)
                while not stop.is_set() and not phase_done(t0, acks0):
                    stop.wait(0.05)
                if stop.is_set():
                    return
                if kills_wanted is not None and kills >= kills_wanted:
                    stop.set()
                    return
                server.kill()
                kills += 1
                time.sleep(0.5)
                if not stop.is_set():
                    server.start()
        except BaseException as exc:  # a restart that fails must fail the run, not leave a dead server
            failure.append(exc)
            stop.set()

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        asyncio.run(run_load(server.url, tokens, project, duration_s, seed=seed, result=result, stop=stop))
    finally:
        stop.set()
        t.join(timeout=120)
    if failure:
        raise RuntimeError(f"restarting the server failed after {kills} kill(s)") from failure[0]
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    return result, kills


def check_exactly_once(session: Any, project: str, acked: list[tuple[str, str, str]]) -> dict[str, int]:
    """Verify every acknowledged submission is stored exactly once and no item exceeds its overlap.

    Returns counts: acked, stored_for_acked, stored_total, items_over_overlap, max_per_item, duplicates.
    """
    from sqlalchemy import func, select

    from alignflow.feedback.models import Item, Response, User
    from alignflow.feedback.services import get_project

    p = get_project(session, project)
    stored = {
        (u, c): n
        for u, c, n in session.execute(
            select(User.username, Response.client_id, func.count())
            .join(User, User.id == Response.user_id)
            .where(Response.project_id == p.id)
            .group_by(User.username, Response.client_id)
        ).all()
    }
    per_item = session.execute(
        select(Response.item_id, func.count())
        .join(Item, Item.id == Response.item_id)
        .where(Response.project_id == p.id, Response.kind == "annotate", ~Item.is_gold)
        .group_by(Response.item_id)
    ).all()
    over_slots = session.scalar(
        select(func.count()).select_from(Item).where(Item.project_id == p.id, Item.slots_taken > p.overlap)
    )
    per_assignment = session.execute(
        select(Response.assignment_id, func.count())
        .where(Response.project_id == p.id)
        .group_by(Response.assignment_id)
    ).all()
    return {
        "acked": len(acked),
        "acked_distinct": len({(u, c) for u, _, c in acked}),
        "stored_for_acked": sum(1 for u, _, c in acked if stored.get((u, c)) == 1),
        "missing_acked": sum(1 for u, _, c in acked if (u, c) not in stored),
        "stored_total": sum(stored.values()),
        "duplicates": sum(1 for n in stored.values() if n > 1) + sum(1 for _, n in per_assignment if n > 1),
        "items_over_overlap": sum(1 for _, n in per_item if n > p.overlap) + int(over_slots),
        "max_per_item": max((n for _, n in per_item), default=0),
    }

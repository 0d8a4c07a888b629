"""Annotation server under load: latency of "next task" and "submit" at 50 concurrent simulated annotators, and the
crash test (SIGKILL + restart every few seconds) at full length, on SQLite and on PostgreSQL.

    python benchmarks/bench_annotation.py [--annotators 50] [--latency-s 30] [--crash-s 60] [--kill-every 10]
                                         [--pg-url postgresql+psycopg://...]   (default $ALIGNFLOW_TEST_PG_URL)

Loopback only; every request loop is bounded in count and time (see alignflow.feedback.loadgen).
The load generator shares the machine's cores with the server, so figures are for the pair, not the server alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).parent))
from _results import markdown_table, write_section  # noqa: E402

from alignflow.feedback import auth, loadgen, services  # noqa: E402
from alignflow.store.db import _normalise_url  # noqa: E402
from alignflow.workspace import Workspace  # noqa: E402


def items(n: int, gold: int) -> list[dict]:
    rows = [
        {
            "id": f"i{k}",
            "prompt": f"Question {k}: explain the trade-offs of approach {k % 17}.",
            "candidates": [
                {
                    "id": "a",
                    "text": "First answer " * 20,
                    "model": "policy-v0",
                    "version": "1",
                    "sampling": {"temperature": 0.7},
                },
                {
                    "id": "b",
                    "text": "Second answer " * 20,
                    "model": "policy-v1",
                    "version": "1",
                    "sampling": {"temperature": 0.7},
                },
            ],
        }
        for k in range(n)
    ]
    rows += [{**rows[k], "id": f"gold{k}", "gold_label": "A"} for k in range(gold)]
    return rows


def prepare(ws: Workspace, annotators: int, project: str, n_items: int) -> dict[str, str]:
    auth.set_password_cost(time_cost=1, memory_cost_kib=1024)  # setup speed only; logins are not measured
    factory = services.connect(ws)
    with factory() as s:
        tokens = {}
        for k in range(annotators):
            u = auth.create_user(s, f"sim{k:02d}", "bench-password", "annotator", pod=f"pod{k % 5}")
            s.flush()
            tokens[u.username] = auth.create_token(s, u, "bench", ["annotate", "read"])[1]
        s.commit()
        services.create_project(s, project, "# Bench guideline", overlap=3, gold_rate=0.1, qa_rate=0.15)
        services.import_items(s, project, items(n_items, gold=20))
    factory.kw["bind"].dispose()
    return tokens


def fresh_db(kind: str, tmp: Path, pg_url: str | None) -> tuple[str, str | None]:
    if kind == "sqlite":
        return f"sqlite:///{tmp / f'bench-{uuid.uuid4().hex[:6]}.db'}", None
    name = f"af_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(_normalise_url(pg_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(_normalise_url(pg_url)).set(database=name).render_as_string(hide_password=False), name


def drop_db(pg_url: str, name: str) -> None:
    admin = create_engine(_normalise_url(pg_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def run_backend(kind: str, args: argparse.Namespace, tmp: Path) -> dict:
    out: dict = {"backend": kind}
    for phase in ("latency", "paced", "crash"):
        url, dbname = fresh_db(kind, tmp, args.pg_url)
        home = tmp / f"{kind}-{phase}"
        home.mkdir()
        ws = Workspace(home=home, db_url=url)
        try:
            tokens = prepare(ws, args.annotators, "bench", args.items)
            workers = args.pg_workers if kind == "postgresql" else 1
            server = loadgen.ServerProcess(home, url, workers=workers)
            server.start()
            try:
                if phase in ("latency", "paced"):
                    think = 0.0 if phase == "latency" else args.think_s
                    res = asyncio.run(
                        loadgen.run_load(server.url, tokens, "bench", args.latency_s, think_s=think)
                    )
                    kills = 0
                else:
                    res, kills = loadgen.run_with_kills(
                        server, tokens, "bench", args.crash_s, args.kill_every
                    )
            finally:
                server.stop()
            factory = services.connect(ws)
            with factory() as s:
                check = loadgen.check_exactly_once(s, "bench", res.acked)
            factory.kw["bind"].dispose()
            out[phase] = {"result": res, "kills": kills, "check": check, "workers": workers}
            print(f"{kind} {phase}: acked={check['acked']} stored={check['stored_total']} "
                  f"missing={check['missing_acked']} dup={check['duplicates']} over={check['items_over_overlap']} "
                  f"kills={kills} next={loadgen.percentiles(res.next_latency_s)} "
                  f"submit={loadgen.percentiles(res.submit_latency_s)} http_errors={res.http_errors}", flush=True)  # fmt: skip
        finally:
            if dbname:
                drop_db(args.pg_url, dbname)
    return out


def fmt(ms: float | None) -> str:
    return "–" if ms is None else f"{ms:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotators", type=int, default=50)
    ap.add_argument("--items", type=int, default=3000)
    ap.add_argument("--latency-s", type=float, default=30)
    ap.add_argument("--crash-s", type=float, default=60)
    ap.add_argument("--kill-every", type=float, default=10)
    ap.add_argument("--think-s", type=float, default=5, help="Mean pause per task in the paced phase.")
    ap.add_argument("--pg-workers", type=int, default=2)
    ap.add_argument("--pg-url", default=os.environ.get("ALIGNFLOW_TEST_PG_URL"))
    ap.add_argument("--no-write", action="store_true", help="Print only; do not update RESULTS.md.")
    args = ap.parse_args()
    backends = ["sqlite"] + (["postgresql"] if args.pg_url else [])
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_backend(b, args, Path(tmp)) for b in backends]
    load_after = os.getloadavg()[0]
    lat_rows, crash_rows = [], []
    for r in results:
        name = (
            "SQLite (1 worker)"
            if r["backend"] == "sqlite"
            else f"PostgreSQL ({r['latency']['workers']} workers)"
        )
        for phase, label in (
            ("latency", "closed loop, no think time"),
            ("paced", f"~{args.think_s:.0f} s think time"),
        ):
            lat = r[phase]["result"]
            n, sub = loadgen.percentiles(lat.next_latency_s), loadgen.percentiles(lat.submit_latency_s)
            lat_rows.append([name, label, str(len(lat.submit_latency_s)), f"{len(lat.submit_latency_s) / args.latency_s:.1f}",
                             fmt(n["p50"]), fmt(n["p95"]), fmt(n["p99"]), fmt(sub["p50"]), fmt(sub["p95"]), fmt(sub["p99"])])  # fmt: skip
        c, cr = r["crash"]["check"], r["crash"]["result"]
        crash_rows.append([name, str(r["crash"]["kills"]), str(c["acked"]), str(c["stored_for_acked"]),
                           str(c["missing_acked"]), str(c["duplicates"]), str(c["stored_total"]),
                           str(c["max_per_item"]), str(c["items_over_overlap"]), str(cr.connection_errors)])  # fmt: skip
    body = (
        f"{args.annotators} simulated annotators (asyncio + httpx, API tokens) against `alignflow serve` on 127.0.0.1, "
        f"{args.items} pairwise items, overlap 3, gold rate 0.1; the load generator runs on the same 2 cores "
        f"(1-minute load average {load_before:.1f} before, {load_after:.1f} after: other jobs shared the machine).\n\n"
        f"Latency, {args.latency_s:.0f} s per run without faults (milliseconds, successful requests). Closed loop: each "
        "annotator sends its next request as soon as the last returns, so latency = concurrency / throughput "
        "(Little's law) and measures saturation; the paced run is closer to people working:\n\n"
        + markdown_table(
            [
                "server",
                "load",
                "submissions",
                "per s",
                "next p50",
                "next p95",
                "next p99",
                "submit p50",
                "submit p95",
                "submit p99",
            ],
            lat_rows,
        )
        + f"\n\nCrash test, {args.crash_s:.0f} s with SIGKILL + restart every {args.kill_every:.0f} s (submissions retried "
        "with the same client id after a connection error):\n\n"
        + markdown_table(
            [
                "server",
                "kills",
                "acknowledged (2xx)",
                "stored exactly once",
                "missing",
                "duplicates",
                "stored total",
                "max answers per item",
                "items over overlap",
                "connection errors",
            ],
            crash_rows,
        )
    )
    print(body)
    if not args.no_write:
        write_section("annotation", "Annotation server: latency at 50 annotators and crash test", body,
                      ("fastapi", "uvicorn", "sqlalchemy", "psycopg"))  # fmt: skip


if __name__ == "__main__":
    main()

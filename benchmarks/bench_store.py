"""Foundation figures: import throughput of a 100k-row pairs JSONL, and lineage query time on a
10k-node graph, SQLite vs PostgreSQL (when ALIGNFLOW_TEST_PG_URL or --pg-url is given).

    python benchmarks/bench_store.py [--rows 100000] [--nodes 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).parent))
from _results import markdown_table, summarize, write_section  # noqa: E402

from alignflow.data.io import import_dataset  # noqa: E402
from alignflow.store import Store  # noqa: E402
from alignflow.store.db import _normalise_url  # noqa: E402
from alignflow.store.models import Artifact, LineageEdge  # noqa: E402
from alignflow.workspace import Workspace  # noqa: E402


def make_pairs(path: Path, n: int) -> None:
    rng = random.Random(0)
    words = "order refund shipping delay sorry thanks account password invoice product".split()
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(rng.choices(words, k=20))
            f.write(
                json.dumps(
                    {
                        "prompt": f"{i} {prompt}",
                        "chosen": " ".join(rng.choices(words, k=40)),
                        "rejected": " ".join(rng.choices(words, k=30)),
                    }
                )
                + "\n"
            )


def build_graph(store: Store, n: int, fanin: int = 2) -> tuple[str, str]:
    """A layered DAG of n artifacts, each with up to `fanin` parents in the previous layer."""
    rng = random.Random(1)
    ids = [uuid.uuid4().hex + uuid.uuid4().hex for _ in range(n)]
    layer = 100
    arts = [dict(id=i, kind="node", uri=f"x/{i}", bytes=0, checksum=i, meta={}) for i in ids]
    edges = []
    for k in range(layer, n):
        lo = (k // layer - 1) * layer
        for p in rng.sample(range(lo, lo + layer), fanin):
            edges.append(dict(parent_id=ids[p], child_id=ids[k], role="input"))
    with store.session() as s:
        s.execute(insert(Artifact), arts)
        s.execute(insert(LineageEdge), edges)
    return ids[-1], ids[0]


def time_it(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def fresh_pg(admin: str) -> tuple[str, callable]:
    admin = _normalise_url(admin)
    name = f"af_bench_{uuid.uuid4().hex[:8]}"
    eng = create_engine(admin, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with eng.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    return make_url(admin).set(database=name).render_as_string(hide_password=False), drop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pg-url", default=os.environ.get("ALIGNFLOW_TEST_PG_URL"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "pairs.jsonl"
        make_pairs(src, args.rows)
        backends = [("SQLite", None)] + ([("PostgreSQL", args.pg_url)] if args.pg_url else [])
        for label, pg in backends:
            url, drop = (
                (f"sqlite:///{tmp / label / 'db.sqlite'}", lambda: None) if pg is None else fresh_pg(pg)
            )
            try:
                store = Store.open(Workspace(home=tmp / label, db_url=url))
                t = time.perf_counter()
                import_dataset(store, src, "pairs")
                imp = time.perf_counter() - t
                leaf, root = build_graph(store, args.nodes)
                up = time_it(lambda st=store, n=leaf: st.lineage(n, "up"), args.repeats)
                down = time_it(lambda st=store, n=root: st.lineage(n, "down"), args.repeats)
                n_up = len(store.lineage(leaf, "up").nodes)
                n_down = len(store.lineage(root, "down").nodes)
                store.close()
            finally:
                drop()
            mu, lo, hi = summarize(up)
            md, dlo, dhi = summarize(down)
            rows.append(
                [
                    label,
                    f"{args.rows / imp:,.0f} rows/s ({imp:.1f} s)",
                    f"{mu * 1000:.0f} ms ({lo * 1000:.0f}–{hi * 1000:.0f}), {n_up} nodes",
                    f"{md * 1000:.0f} ms ({dlo * 1000:.0f}–{dhi * 1000:.0f}), {n_down} nodes",
                ]
            )
    header = [
        "database",
        f"import {args.rows:,}-row pairs JSONL",
        f"lineage up from a leaf ({args.nodes:,}-node DAG)",
        "lineage down from a root",
    ]
    table = markdown_table(header, rows)
    print(table)
    write_section(
        "store",
        "Store: import throughput and lineage queries",
        f"Median of {args.repeats} after a warm-up (min–max).\n\n{table}",
        ("sqlalchemy", "pyarrow", "psycopg"),
    )


if __name__ == "__main__":
    main()

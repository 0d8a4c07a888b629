"""Serving throughput and latency: the builtin engine with request batching vs one request at a time, and the
gateway's overhead over the engine alone.

Run: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serving.py [--clients 32] [--per-client 4]
[--max-tokens 16] [--no-write]`. Prints a table and writes the `serving` section of benchmarks/RESULTS.md.

Load: `--clients` concurrent clients in a closed loop (each sends its next request when the previous one is
answered), `--per-client` requests each, short chat prompts (one support-style sentence, ~20 prompt tokens),
`--max-tokens` new tokens, temperature 0.8 without a seed (so every request can share a batch; the random
tiny models rarely sample EOS, so nearly every reply runs to max_tokens). Latency is per request, from send to
answer, queueing included. Models: the quickstart-size tiny Llama (hidden 128, 4 layers, vocab 600) and a
larger one (hidden 256, 6 layers, vocab 2000), fp32 on CPU, one torch thread.

Rows: the engine alone (`BuiltinEngine.generate` from the clients' coroutines) with `max_batch=32,
batch_window_ms=10` and with `max_batch=1` (one request per decode; the same engine otherwise); then the
gateway over the batched engine: `alignflow deploy serve` in its own process on a local port, driven over HTTP
by `httpx.AsyncClient` (`/v1/chat/completions` with an API key). Single-client rows of the engine and the
gateway give the per-request overhead without queueing. The clients and the gateway share the 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import markdown_table, write_section  # noqa: E402

from alignflow.domains import support  # noqa: E402
from alignflow.models import load_policy, load_tokenizer, make_tiny_model_dir  # noqa: E402
from alignflow.serving.engine import BuiltinEngine, GenRequest  # noqa: E402

SIZES = {
    "tiny (h128, L4, V600; quickstart)": {"hidden_size": 128, "num_layers": 4, "vocab_size": 600},
    "small (h256, L6, V2000)": {"hidden_size": 256, "num_layers": 6, "vocab_size": 2000},
}

SOLO = 32  # requests of the one-client rows
BATCHED = {"max_batch": 32, "batch_window_ms": 10}
ONE_AT_A_TIME = {"max_batch": 1, "batch_window_ms": 0}

Send = Callable[[GenRequest], Awaitable[int]]  # one request -> completion tokens


def build_models(root: Path) -> dict[str, tuple[Path, int]]:
    out = {}
    for label, size in SIZES.items():
        path = make_tiny_model_dir(
            root / label.split()[0], texts=support.corpus(4000, seed=0), max_position_embeddings=256, **size
        )
        params = sum(p.numel() for p in load_policy(path, dtype="float32").parameters())
        out[label] = (path, params)
    return out


def requests(n: int, max_tokens: int) -> list[GenRequest]:
    sentences = support.corpus(n, seed=1)
    return [
        GenRequest(
            messages=[{"role": "user", "content": s.split("\n")[0][:120]}],
            max_tokens=max_tokens,
            temperature=0.8,
        )
        for s in sentences
    ]


async def closed_loop(send: Send, reqs: list[GenRequest], clients: int) -> dict[str, float]:
    """``clients`` coroutines share ``reqs`` (client i sends reqs[i::clients] one after another)."""
    latencies: list[float] = []
    tokens = 0

    async def client(mine: list[GenRequest]) -> None:
        nonlocal tokens
        for r in mine:
            t0 = time.perf_counter()
            n = await send(r)  # not `tokens += await ...`: that reads tokens before the await
            tokens += n
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(reqs[i::clients]) for i in range(clients)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "rps": len(lat) / wall,
        "tokens_per_s": tokens / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "wall_s": wall,
    }


async def engine_row(engine: BuiltinEngine, reqs: list[GenRequest], clients: int) -> dict[str, float]:
    async def send(r: GenRequest) -> int:
        return (await engine.generate(r)).completion_tokens

    await closed_loop(send, reqs[:8], min(8, clients))  # warm-up
    engine.stats.batch_sizes.clear()
    res = await closed_loop(send, reqs, clients)
    res["mean_batch"] = statistics.mean(engine.stats.batch_sizes)
    return res


def gateway_available() -> bool:
    try:
        import alignflow.serving.app  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def gateway_process(model_dir: Path, home: Path, engine_kw: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """`alignflow deploy serve` over ``model_dir`` in its own process (one torch thread), as it is deployed;
    yields ``(base URL, API key)``. (uvicorn in a thread of this process was tried first: its loop shares the
    GIL with the clients' loop and the decode thread, and even a bare FastAPI route took ~44 ms a request.)"""
    import httpx

    exe = Path(sys.executable).with_name("alignflow")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ALIGNFLOW_HOME": str(home)}
    env.pop("ALIGNFLOW_DB_URL", None)
    config = home.parent / "deploy.yaml"
    model = {"name": "m", "ref": str(model_dir), **engine_kw}
    config.write_text(
        json.dumps({"models": [model], "limits": {"max_tokens": 256, "rate_per_minute": 10**9}})
    )  # JSON is YAML
    added = subprocess.run(
        [str(exe), "deploy", "keys", "add", "bench", "--rate", str(10**9), "--json", "--home", str(home)],
        env=env, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    key = json.loads(added.stdout.strip().splitlines()[-1])["key"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [str(exe), "deploy", "serve", "--config", str(config), "--port", str(port), "--home", str(home)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start within 120 s")
            time.sleep(0.2)
        yield url, key
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def gateway_rows(
    path: Path, reqs: list[GenRequest], clients: int, engine_kw: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """The load through the gateway over HTTP (`httpx.AsyncClient`, one connection per client): all clients,
    then one client alone."""
    import httpx

    out: dict[str, dict[str, float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-serving-gw-") as tmp,
        gateway_process(path, Path(tmp) / "ws", engine_kw) as (url, key),
    ):

        async def run() -> None:
            limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
            async with httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300, limits=limits
            ) as http:

                async def send(r: GenRequest) -> int:
                    body = {"model": "m", "messages": r.messages, "max_tokens": r.max_tokens,
                            "temperature": r.temperature}  # fmt: skip
                    resp = await http.post("/v1/chat/completions", json=body)
                    resp.raise_for_status()
                    return int(resp.json()["usage"]["completion_tokens"])

                await closed_loop(send, reqs[:8], 8)  # warm-up
                out[f"gateway over the batched engine, {clients} clients"] = await closed_loop(
                    send, reqs, clients
                )
                out["gateway, 1 client"] = await closed_loop(send, reqs[:SOLO], 1)

        asyncio.run(run())
    return out


def fmt(res: dict[str, float]) -> list[str]:
    return [
        f"{res['rps']:.1f}",
        f"{res['tokens_per_s']:.0f}",
        f"{res['p50_ms']:.0f}",
        f"{res['p99_ms']:.0f}",
        f"{res['mean_batch']:.1f}" if "mean_batch" in res else "–",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reqs = requests(args.clients * args.per_client, args.max_tokens)
    header = ["model", "path", "requests/s", "tokens/s", "p50 ms", "p99 ms", "mean batch"]
    rows: list[list[str]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        models = build_models(Path(tmp))
        for label, (path, params) in models.items():
            tok = load_tokenizer(path, padding_side="left")
            model = load_policy(path, dtype="float32")
            name = f"{label}, {params / 1e6:.2f}M params"
            probe = BuiltinEngine(model, tok, version=label)
            prompt_tokens = statistics.mean(len(probe.encode(r)) for r in reqs)
            res: dict[str, dict[str, float]] = {}
            for row_label, kw, n_clients, load in (
                (
                    f"engine, batched (max_batch 32, 10 ms window), {args.clients} clients",
                    BATCHED,
                    args.clients,
                    reqs,
                ),
                (
                    f"engine, one at a time (max_batch 1), {args.clients} clients",
                    ONE_AT_A_TIME,
                    args.clients,
                    reqs,
                ),
                ("engine, batched, 1 client", BATCHED, 1, reqs[:SOLO]),
            ):
                engine = BuiltinEngine(model, tok, version=label, seed=0, **kw)
                res[row_label] = asyncio.run(engine_row(engine, load, n_clients))
                asyncio.run(engine.aclose())
            if gateway_available():
                res |= gateway_rows(path, reqs, args.clients, BATCHED)
            for row_label, r in res.items():
                rows.append([name, row_label, *fmt(r)])
                print(rows[-1], flush=True)
            b, one = list(res.values())[:2]
            notes.append(
                f"- {name}: batching gives {b['rps'] / one['rps']:.1f}× the requests/s of one request at a time; "
                f"p50 latency {one['p50_ms']:.0f} → {b['p50_ms']:.0f} ms, p99 {one['p99_ms']:.0f} → "
                f"{b['p99_ms']:.0f} ms (mean prompt {prompt_tokens:.0f} tokens)."
            )
            if gateway_available():
                g = res[f"gateway over the batched engine, {args.clients} clients"]
                solo_e, solo_g = res["engine, batched, 1 client"], res["gateway, 1 client"]
                notes.append(
                    f"  Gateway overhead: {args.clients} clients {b['rps']:.1f} → {g['rps']:.1f} requests/s "
                    f"({100 * (g['rps'] / b['rps'] - 1):+.0f}%), p50 {b['p50_ms']:.0f} → {g['p50_ms']:.0f} ms; "
                    f"one client p50 {solo_e['p50_ms']:.1f} → {solo_g['p50_ms']:.1f} ms "
                    f"({solo_g['p50_ms'] - solo_e['p50_ms']:+.1f} ms per request: HTTP client + server, key check, "
                    "validation, JSON)."
                )
    if not gateway_available():
        notes.append(
            "- Gateway rows missing: `alignflow.serving.app` did not exist when this ran, so its overhead over "
            "the engine alone was not measured."
        )
    body = "\n".join(
        [
            f"{args.clients} concurrent clients in a closed loop, {args.per_client} requests each "
            f"({args.clients * args.per_client} requests per row), short chat prompts, {args.max_tokens} new "
            "tokens, temperature 0.8 (no seed: every request may share a batch), fp32, "
            f"{args.threads} torch thread (OMP_NUM_THREADS=1). The machine (2 cores) was shared with other "
            "jobs while this ran, so absolute numbers are noisy; rows of one model ran back to back.",
            "",
            markdown_table(header, rows),
            "",
            *notes,
        ]
    )
    print(body)
    if not args.no_write:
        write_section(
            "serving", "Serving: request batching and gateway overhead", body, ("torch", "transformers")
        )


if __name__ == "__main__":
    main()

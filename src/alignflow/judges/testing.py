"""A faithful local OpenAI-compatible server, for testing and benchmarking ``openai:`` judges offline.

:func:`make_app` is a FastAPI app implementing ``POST /v1/chat/completions`` and ``GET /v1/models`` with
OpenAI's response schema (``id``, ``object``, ``created``, ``model``, ``choices[].message``,
``choices[].logprobs.content[].top_logprobs``, ``usage``) and OpenAI-style error bodies
(``{"error": {"message", "type", "param", "code"}}``). A *policy* decides each reply's text from the request's
messages. :class:`FakeOpenAI` holds the knobs tests turn — fail the first N requests with 429 (with
``retry-after``) or 500, delay replies (to trip timeouts), return a malformed body, require an API key —
and what they check: requests received, the most requests in flight at once, the bodies.

:func:`serve` runs the app with uvicorn on a free port in a background thread::

    with serve(FakeOpenAI(policy=pairwise_policy(longer_wins))) as fake:
        judge = load_judge(f"openai:judge@{fake.base_url}#api_key=${{ENV:KEY}}")

Its 401 message quotes the whole wrong key (OpenAI's quotes a masked one), so tests of key redaction bite.
"""

from __future__ import annotations

import asyncio
import math
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

# messages -> reply text, or (reply text, first token's {token: logprob})
Policy = Callable[[list[dict[str, Any]]], "str | tuple[str, dict[str, float]]"]

_SECTION = re.compile(
    r"\[User Question\]\n(?P<prompt>.*?)\n\n\[The Start of Assistant A's Answer\]\n(?P<a>.*?)\n"
    r"\[The End of Assistant A's Answer\]\n\n\[The Start of Assistant B's Answer\]\n(?P<b>.*?)\n"
    r"\[The End of Assistant B's Answer\]",
    re.DOTALL,
)


def pairwise_policy(rule: Callable[[str, str, str], str]) -> Policy:
    """A judge policy for the shipped ``pairwise.txt`` layout: ``rule(prompt, a, b)`` returns "A", "B" or
    "tie"; a message not in that layout gets a reply that is not a verdict."""

    def policy(messages: list[dict[str, Any]]) -> str:
        m = _SECTION.search(str(messages[-1].get("content", "")))
        if not m:
            return "I cannot find two answers to compare."
        return rule(m.group("prompt"), m.group("a"), m.group("b"))

    return policy


def longer_wins(prompt: str, a: str, b: str) -> str:
    """A position-independent rule: the answer with more words wins; equal lengths tie."""
    la, lb = len(a.split()), len(b.split())
    return "A" if la > lb else "B" if lb > la else "tie"


@dataclass
class FakeOpenAI:
    """Knobs and counters of one fake server (all counters are read after requests complete).

    ``fail_first``/``fail_status``: the first N chat requests get that status (429 with ``retry-after``
    of ``retry_after`` seconds, or e.g. 500). ``delay``: seconds before replying, to the first
    ``delay_first`` requests (all when None). ``malformed``: ``"empty_choices"`` (a 200 with no choices) or
    ``"not_json"``. ``api_key``: required as ``Authorization: Bearer`` (401 otherwise); None accepts any.
    ``logprob``: the probability given to the reply's first token in ``top_logprobs`` when the policy gives
    none (the rest is shared by "A", "B", "tie", "1".."10" alternatives).
    """

    policy: Policy = field(default_factory=lambda: pairwise_policy(longer_wins))
    api_key: str | None = None
    fail_first: int = 0
    fail_status: int = 429
    retry_after: float = 0.01
    delay: float = 0.0
    delay_first: int | None = None
    malformed: str | None = None
    logprob: float = 0.9
    models: tuple[str, ...] = ("judge",)
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    base_url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reset(self) -> None:
        with self._lock:
            self.requests = self.max_in_flight = 0
            self.bodies.clear()


def _error(
    status: int, message: str, type_: str, code: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _top_logprobs(content: str, p: float, n: int) -> list[dict[str, Any]]:
    first = content.split()[0] if content.split() else content
    alts = [t for t in ("A", "B", "tie", *map(str, range(1, 11))) if t != first]
    rest = (1.0 - p) / len(alts)
    ranked = [(first, p)] + [(t, rest) for t in alts]
    return [{"token": t, "logprob": math.log(q), "bytes": list(t.encode())} for t, q in ranked[:n]]


def make_app(fake: FakeOpenAI) -> FastAPI:
    """The FastAPI app serving ``fake``'s policy and knobs."""
    app = FastAPI()

    def authorised(request: Request) -> Any:
        if fake.api_key is None:
            return None
        got = request.headers.get("authorization", "")
        key = got.removeprefix("Bearer ").strip()
        if key != fake.api_key:
            return _error(
                401, f"Incorrect API key provided: {key}.", "invalid_request_error", "invalid_api_key"
            )
        return None

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        if (denied := authorised(request)) is not None:
            return denied
        now = int(time.time())
        data = [{"id": m, "object": "model", "created": now, "owned_by": "alignflow"} for m in fake.models]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        with fake._lock:
            fake.requests += 1
            n = fake.requests
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            if (denied := authorised(request)) is not None:
                return denied
            body = await request.json()
            with fake._lock:
                fake.bodies.append(body)
            if fake.delay and (fake.delay_first is None or n <= fake.delay_first):
                await asyncio.sleep(fake.delay)
            if n <= fake.fail_first:
                if fake.fail_status == 429:
                    return _error(
                        429,
                        "Rate limit reached for requests.",
                        "requests",
                        "rate_limit_exceeded",
                        {
                            "retry-after": f"{fake.retry_after:g}",
                            "retry-after-ms": f"{fake.retry_after * 1000:g}",
                        },
                    )
                return _error(fake.fail_status, "The server had an error.", "server_error", None)
            model, messages = body.get("model"), body.get("messages")
            if fake.models and model not in fake.models:
                return _error(
                    404, f"The model `{model}` does not exist.", "invalid_request_error", "model_not_found"
                )
            if not isinstance(messages, list) or not messages:
                return _error(400, "'messages' must be a non-empty array.", "invalid_request_error", None)
            if fake.malformed == "not_json":
                return PlainTextResponse("<html>upstream error</html>", status_code=200)
            out = fake.policy(messages)
            content, top = out if isinstance(out, tuple) else (out, None)
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
            if body.get("logprobs"):
                k = int(body.get("top_logprobs") or 0)
                alts = (
                    [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top.items()][:k]
                    if top is not None
                    else _top_logprobs(content, fake.logprob, k)
                )
                first = alts[0] if alts else {"token": content, "logprob": 0.0, "bytes": []}
                choice["logprobs"] = {
                    "content": [{**first, "top_logprobs": alts}],
                    "refusal": None,
                }
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
            completion_tokens = max(1, len(content.split()))
            return JSONResponse(
                {
                    "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [] if fake.malformed == "empty_choices" else [choice],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                    "system_fingerprint": "fp_alignflow",
                }
            )
        finally:
            with fake._lock:
                fake.in_flight -= 1

    return app


def free_socket() -> socket.socket:
    """A socket bound to a free port on 127.0.0.1 (uvicorn serves on it; the port cannot be taken meanwhile)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serve_app(app: Any, lifespan: str = "auto", start_timeout: float = 20.0) -> Iterator[str]:
    """Run an ASGI ``app`` with uvicorn on a free port in a background thread; yields its base URL
    (``http://127.0.0.1:PORT``) while the block runs, then shuts the server down."""
    import uvicorn

    sock = free_socket()
    server = uvicorn.Server(
        uvicorn.Config(
            app, log_level="warning", lifespan=lifespan, access_log=False, timeout_graceful_shutdown=1
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@contextmanager
def serve(fake: FakeOpenAI | None = None) -> Iterator[FakeOpenAI]:
    """Run ``fake`` (default: a :func:`longer_wins` judge) on ``127.0.0.1:<free port>`` in a thread; its
    ``base_url`` (``http://127.0.0.1:PORT/v1``) is set while the block runs."""
    fake = fake or FakeOpenAI()
    with serve_app(make_app(fake), lifespan="off", start_timeout=10) as base:
        fake.base_url = f"{base}/v1"
        yield fake

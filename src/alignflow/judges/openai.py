"""``openai:MODEL@BASE_URL``: a judge behind any OpenAI-compatible ``/v1/chat/completions`` endpoint.

Always through the official ``openai`` client, which retries timeouts, 408/409/429 and 5xx replies with
exponential backoff (0.5 s doubling to 8 s, honouring ``retry-after``) up to ``max_retries`` times.
:class:`Endpoint` adds what a judged dataset needs on top: an on-disk reply cache (:mod:`alignflow.judges.cache`;
a re-run sends nothing), a concurrency limit (a thread pool over one shared client), a request budget, and
API-key hygiene (the key is read from ``${ENV:NAME}`` at build time and is never stored, logged or put in an
error; messages are scrubbed of it in case a server echoes it back).

Options (after ``#`` in the spec): ``api_key`` (an ``${ENV:NAME}`` reference; default
``${ENV:OPENAI_API_KEY}``), ``template`` (a file; default the shipped ``pairwise.txt`` / ``rubric.txt``),
``mode`` (``pairwise`` or ``rubric``: a 1–10 rating, which can score single responses), ``timeout``
(seconds per attempt, default 60), ``max_retries`` (default 3), ``concurrency`` (max requests in flight,
default 4), ``budget`` (max requests sent by this judge, default unlimited; cached replies cost nothing),
``cache_dir`` (default ``<workspace>/judge-cache`` with a store, else ``~/.cache/alignflow/judges``; ``none``
turns the cache off), ``temperature`` (default 0), ``max_tokens`` (default 8 pairwise, 4 rubric),
``logprobs`` (``true``/``false``, default true: the first token's ``top_logprobs`` give the verdict's
confidence; servers that do not return them fall back to the reply's text, confidence None).

The cache key is ``(backend, model, request body)``; the body carries the rendered template, so the template
text, the prompt and the candidates are all in it. The base URL is not: one model name served from another
host reuses the cache (set ``cache_dir`` per server if their models differ under one name).
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignflow.judges.base import BaseJudge, JudgeError, Verdict, register_backend
from alignflow.judges.cache import ReplyCache, cache_key
from alignflow.judges.templates import Template, load_template

_ENV_REF = re.compile(r"^\$\{ENV:([A-Za-z_][A-Za-z0-9_]*)\}$")
DEFAULT_KEY_REF = "${ENV:OPENAI_API_KEY}"


@dataclass(frozen=True)
class ChatReply:
    """One chat completion: the reply text, the first token's top log-probabilities (token → logprob, when
    the request asked for them and the server gave them) and whether it came from the cache."""

    content: str
    top_logprobs: dict[str, float] | None
    cached: bool


def resolve_key(ref: str, where: str) -> str:
    """The value of an ``${ENV:NAME}`` reference. A literal key is refused so it never lands in a spec."""
    m = _ENV_REF.match(ref)
    if not m:
        raise JudgeError(
            f"{where}: api_key must be an ${{ENV:NAME}} reference (the key itself is never put in a spec)"
        )
    value = os.environ.get(m.group(1))
    if not value:
        raise JudgeError(f"{where}: api_key {ref}: environment variable {m.group(1)} is not set or empty")
    return value


class Endpoint:
    """An OpenAI-compatible chat endpoint with a reply cache, a concurrency limit and a request budget.

    ``chat_many(requests)`` takes keyword arguments for ``client.chat.completions.create`` without ``model``
    (``messages``, ``max_tokens``, ``temperature``, ``logprobs``, ``top_logprobs``, ...) and returns one
    :class:`ChatReply` each, in order. Cached requests are answered from disk; identical requests in one call
    are sent once; the rest go out at most ``concurrency`` at a time. ``stats`` counts what was sent.
    """

    def __init__(
        self,
        model: str,
        base_url: str,
        *,
        api_key: str = DEFAULT_KEY_REF,
        timeout: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 4,
        budget: int | None = None,
        cache_dir: str | Path | None = None,
        backend: str = "openai",
    ) -> None:
        import openai

        self.model, self.base_url, self.backend = model, base_url, backend
        self.where = f"{backend}:{model}@{base_url}"
        if concurrency < 1:
            raise JudgeError(f"{self.where}: concurrency must be ≥ 1, got {concurrency}")
        if budget is not None and budget < 0:
            raise JudgeError(f"{self.where}: budget must be ≥ 0, got {budget}")
        if timeout <= 0 or max_retries < 0:
            raise JudgeError(f"{self.where}: timeout must be > 0 and max_retries ≥ 0")
        self.api_key_ref = api_key
        self._key = resolve_key(api_key, self.where)
        self.timeout, self.max_retries = timeout, max_retries
        self.concurrency, self.budget = concurrency, budget
        self.cache = ReplyCache(cache_dir) if cache_dir is not None else None
        self._lock = threading.Lock()
        self._stats = {"requests_sent": 0, "attempts": 0, "cache_hits": 0}

        def count_attempt(request: Any) -> None:  # every HTTP attempt, retries included
            with self._lock:
                self._stats["attempts"] += 1

        self.client = openai.OpenAI(
            base_url=base_url,
            api_key=self._key,
            timeout=timeout,
            max_retries=max_retries,
            http_client=openai.DefaultHttpxClient(event_hooks={"request": [count_attempt]}),
        )

    def __repr__(self) -> str:  # no key, ever
        return f"Endpoint({self.where!r}, api_key={self.api_key_ref!r})"

    @property
    def stats(self) -> dict[str, int]:
        """``requests_sent`` (logical requests, each billed once), ``attempts`` (HTTP attempts incl.
        retries), ``retries`` (attempts − requests) and ``cache_hits``."""
        with self._lock:
            s = dict(self._stats)
        return s | {"retries": max(0, s["attempts"] - s["requests_sent"])}

    def scrub(self, text: str) -> str:
        """``text`` with the API key replaced by ``***`` (servers may echo a wrong key back)."""
        return text.replace(self._key, "***") if self._key else text

    def key_for(self, request: dict[str, Any]) -> str:
        return cache_key({"backend": self.backend, "model": self.model, "request": request})

    def chat_many(
        self,
        requests: Sequence[dict[str, Any]],
        *,
        what: str = "request",
        check: Callable[[int, ChatReply], None] | None = None,
    ) -> list[ChatReply]:
        """Replies to ``requests`` in order. ``what`` names an item in errors (``"item"`` → ``item 3``).
        ``check(i, reply)`` may raise to reject a reply: a rejected reply is not cached, the other new replies
        are, and the first rejection (by index) is raised."""
        keys = [self.key_for(r) for r in requests]
        replies: list[ChatReply | None] = [None] * len(requests)
        todo: dict[str, int] = {}  # key -> first index needing it
        for i, k in enumerate(keys):
            hit = self.cache.get(k) if self.cache is not None else None
            if hit is not None and isinstance(hit.get("content"), str):
                replies[i] = ChatReply(hit["content"], hit.get("top_logprobs"), cached=True)
            elif k not in todo:
                todo[k] = i
        with self._lock:
            self._stats["cache_hits"] += sum(r is not None for r in replies)
            sent = self._stats["requests_sent"]
            if self.budget is not None and sent + len(todo) > self.budget:
                raise JudgeError(
                    f"{self.where}: request budget of {self.budget} exceeded: {sent} sent so far, "
                    f"{len(todo)} more needed for {len(requests) - sum(r is not None for r in replies)} of "
                    f"{len(requests)} {what}s ({len(requests) - len(todo)} answered from the cache or "
                    "repeated; cached items cost nothing); raise budget= or judge fewer items"
                )
            self._stats["requests_sent"] += len(todo)

        def send(i: int) -> ChatReply:
            return self._send(requests[i], f"{what} {i}")

        fresh: dict[int, ChatReply | BaseException] = {}
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo))) as pool:
                futures = {i: pool.submit(send, i) for i in todo.values()}
                for i, fut in futures.items():
                    exc = fut.exception()
                    fresh[i] = exc if exc is not None else fut.result()
        errors: list[tuple[int, BaseException]] = []
        for i, out in sorted(fresh.items()):
            if isinstance(out, BaseException):
                errors.append((i, out))
                continue
            try:
                if check is not None:
                    check(i, out)
            except JudgeError as exc:
                errors.append((i, exc))
                continue
            if self.cache is not None:
                self.cache.put(keys[i], {"content": out.content, "top_logprobs": out.top_logprobs})
        for i, k in enumerate(keys):
            if replies[i] is None:
                out = fresh.get(todo[k])
                if isinstance(out, ChatReply):
                    replies[i] = out if todo[k] == i else ChatReply(out.content, out.top_logprobs, False)
        if check is not None:  # a cache filled under another check (an older version) may hold rejects
            for i, r in enumerate(replies):
                if r is not None and r.cached:
                    try:
                        check(i, r)
                    except JudgeError as exc:
                        errors.append((i, exc))
        if errors:
            errors.sort(key=lambda e: e[0])
            exc = errors[0][1]
            if isinstance(exc, JudgeError):
                raise exc
            raise JudgeError(self.scrub(f"{self.where}: {what} {errors[0][0]}: {exc}")) from None
        return [r for r in replies if r is not None]

    def _send(self, request: dict[str, Any], name: str) -> ChatReply:
        import openai

        try:
            resp = self.client.chat.completions.create(model=self.model, **request)
        except openai.AuthenticationError as exc:
            raise JudgeError(
                self.scrub(
                    f"{self.where}: {name}: authentication failed ({exc.status_code}): {_message(exc)}; "
                    f"check the key in {self.api_key_ref}"
                )
            ) from None
        except openai.APITimeoutError:
            raise JudgeError(
                f"{self.where}: {name}: timed out after {self.timeout:g} s on each of "
                f"{self.max_retries + 1} attempts; raise timeout= or max_retries="
            ) from None
        except openai.APIConnectionError as exc:
            raise JudgeError(
                self.scrub(
                    f"{self.where}: {name}: cannot connect ({exc}) after {self.max_retries + 1} attempts"
                )
            ) from None
        except openai.APIStatusError as exc:
            retried = exc.status_code in (408, 409, 429) or exc.status_code >= 500
            tail = f" after {self.max_retries + 1} attempts" if retried else ""
            raise JudgeError(
                self.scrub(f"{self.where}: {name}: HTTP {exc.status_code}{tail}: {_message(exc)}")
            ) from None
        except openai.APIResponseValidationError as exc:
            raise JudgeError(self.scrub(f"{self.where}: {name}: malformed reply: {exc}")) from None
        return self._reply(resp, name)

    def _reply(self, resp: Any, name: str) -> ChatReply:
        choices = getattr(resp, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise JudgeError(f"{self.where}: {name}: malformed reply: no choices in {_preview(resp)}")
        choice = choices[0]
        content = getattr(getattr(choice, "message", None), "content", None)
        if not isinstance(content, str):
            raise JudgeError(f"{self.where}: {name}: malformed reply: choices[0].message.content is not text")
        top: dict[str, float] | None = None
        lp = getattr(choice, "logprobs", None)
        tokens = getattr(lp, "content", None) if lp is not None else None
        if tokens:
            top = {}
            for alt in getattr(tokens[0], "top_logprobs", None) or []:
                tok, val = getattr(alt, "token", None), getattr(alt, "logprob", None)
                if isinstance(tok, str) and isinstance(val, int | float) and math.isfinite(val):
                    top[tok] = max(float(val), top.get(tok, -math.inf))
            top = top or None
        return ChatReply(content, top, cached=False)


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
    return str(getattr(exc, "message", exc))


def _preview(obj: Any, n: int = 120) -> str:
    text = repr(obj)
    return text if len(text) <= n else text[:n] + "…"


# --------------------------------------------------------------------------- the judge

_VERDICT = re.compile(r"^[\s\"'*`\[(]*(A|B|tie)(?![A-Za-z0-9])", re.IGNORECASE)
_RATING = re.compile(r"^[\s\"'*`\[(]*(10|[1-9])(?![0-9])(\s*/\s*10)?")


def parse_verdict(text: str) -> int | None | str:
    """0 for "A", 1 for "B", None for "tie", or the string ``"?"`` when the reply starts with none of them."""
    m = _VERDICT.match(text)
    if not m:
        return "?"
    return {"A": 0, "B": 1, "TIE": None}[m.group(1).upper()]


def verdict_probabilities(top: dict[str, float] | None) -> tuple[float, float] | None:
    """P("A"), P("B") of the first token from its top log-probabilities (tokens compared stripped and
    case-insensitively, so " A" counts as "A"). A letter missing from the top-k has at most the smallest
    listed probability; it is given that bound, so the confidence errs low. None without either letter."""
    if not top:
        return None
    probs = {"A": 0.0, "B": 0.0}
    for tok, lp in top.items():
        t = tok.strip().upper()
        if t in probs:
            probs[t] += math.exp(lp)
    if probs["A"] == 0.0 and probs["B"] == 0.0:
        return None
    floor = math.exp(min(top.values()))
    return probs["A"] or floor, probs["B"] or floor


class OpenAIJudge(BaseJudge):
    """Pairwise: one request per ordered pair, the reply "A", "B" or "tie". Rubric: one request per response,
    the reply a 1–10 rating (so it also scores single responses)."""

    def __init__(
        self,
        spec: str,
        endpoint: Endpoint,
        template: Template,
        mode: str,
        temperature: float,
        max_tokens: int,
        logprobs: bool,
    ) -> None:
        self.spec, self.endpoint, self.template, self.mode = spec, endpoint, template, mode
        self.temperature, self.max_tokens, self.logprobs = temperature, max_tokens, logprobs

    def _request(self, text: str) -> dict[str, Any]:
        req: dict[str, Any] = {
            "messages": [{"role": "user", "content": text}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.logprobs:
            req |= {"logprobs": True, "top_logprobs": 5}
        return req

    def _ratings(self, texts: list[str]) -> list[float]:
        def check(i: int, reply: ChatReply) -> None:
            if not _RATING.match(reply.content):
                raise JudgeError(
                    f"judge {self.spec!r}: item {i}: expected a rating 1-10, got {reply.content[:60]!r}"
                )

        replies = self.endpoint.chat_many([self._request(t) for t in texts], what="item", check=check)
        return [float(_RATING.match(r.content).group(1)) for r in replies]  # type: ignore[union-attr]

    def judge_many(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[Verdict]:
        for i, (_, cands) in enumerate(items):
            if len(cands) != 2 and self.mode == "pairwise":
                raise JudgeError(
                    f"judge {self.spec!r}: item {i}: a pairwise judge compares 2 candidates, got {len(cands)}"
                )
        if self.mode == "rubric":
            flat = [(p, c) for p, cands in items for c in cands]
            scores = iter(self._ratings([self.template.render(prompt=p, response=c) for p, c in flat]))
            return [Verdict.from_scores([next(scores) for _ in cands]) for _, cands in items]

        def check(i: int, reply: ChatReply) -> None:
            if parse_verdict(reply.content) == "?":
                raise JudgeError(
                    f"judge {self.spec!r}: item {i}: expected a reply starting with 'A', 'B' or 'tie', got "
                    f"{reply.content[:60]!r}"
                )

        texts = [self.template.render(prompt=p, a=c[0], b=c[1]) for p, c in items]
        replies = self.endpoint.chat_many([self._request(t) for t in texts], what="item", check=check)
        out = []
        for reply in replies:
            winner = parse_verdict(reply.content)
            assert winner != "?"  # rejected by check
            probs = verdict_probabilities(reply.top_logprobs)
            if winner is None:
                out.append(Verdict(None, (0, 1), confidence=0.5))
                continue
            conf = probs[winner] / (probs[0] + probs[1]) if probs else None
            scores = (math.log(probs[0]), math.log(probs[1])) if probs else None
            out.append(Verdict(winner, (winner, 1 - winner), scores=scores, confidence=conf))  # type: ignore[arg-type]
        return out

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if self.mode != "rubric":
            return super().score(prompts, responses)
        return self._ratings(
            [self.template.render(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)]
        )

    @property
    def pointwise(self) -> bool:
        return self.mode == "rubric"

    def describe(self) -> dict[str, Any]:
        """What produced the scores, for a ``scorer`` record (the key's ``${ENV:...}`` name, never the key)."""
        return {
            "backend": "openai",
            "model": self.endpoint.model,
            "base_url": self.endpoint.base_url,
            "api_key": self.endpoint.api_key_ref,
            "mode": self.mode,
            "template": self.template.source,
            "template_sha256": self.template.sha256,
            "temperature": self.temperature,
        }


_OPTIONS = {
    "api_key",
    "template",
    "mode",
    "timeout",
    "max_retries",
    "concurrency",
    "budget",
    "cache_dir",
    "temperature",
    "max_tokens",
    "logprobs",
}


def _convert(options: dict[str, Any], key: str, kind: type, default: Any, spec: str) -> Any:
    raw = options.get(key, default)
    if (
        raw is None
        or isinstance(raw, kind)
        and not isinstance(raw, bool)
        or kind is bool
        and isinstance(raw, bool)
    ):
        return raw
    text = str(raw).strip()
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return kind(text)
    except ValueError:
        raise JudgeError(
            f"judge {spec!r}: option {key}={text!r}: expected a{'n' if kind is int else ''} {kind.__name__}"
        ) from None


def default_cache_dir(store: Any) -> Path:
    """``<workspace>/judge-cache`` when there is a store, else ``~/.cache/alignflow/judges``."""
    if store is not None:
        return Path(store.workspace.home) / "judge-cache"
    return Path("~/.cache/alignflow/judges").expanduser()


def _build(rest: str, store: Any, device: str, options: dict[str, Any]) -> OpenAIJudge:
    spec = f"openai:{rest}"
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise JudgeError(f"judge {spec!r}: unknown option(s) {unknown}; known: {sorted(_OPTIONS)}")
    model, at, base_url = rest.partition("@")
    if not model or not at or not base_url.startswith(("http://", "https://")):
        raise JudgeError(
            f"judge {spec!r}: expected openai:MODEL@BASE_URL, e.g. openai:gpt-4o-mini@http://host:8000/v1"
        )
    mode = str(options.get("mode", "pairwise"))
    template = load_template(options.get("template"), mode, spec)
    cache_dir = options.get("cache_dir")
    if cache_dir is None:
        cache_dir = default_cache_dir(store)
    elif str(cache_dir).lower() == "none":
        cache_dir = None
    endpoint = Endpoint(
        model,
        base_url,
        api_key=str(options.get("api_key", DEFAULT_KEY_REF)),
        timeout=_convert(options, "timeout", float, 60.0, spec),
        max_retries=_convert(options, "max_retries", int, 3, spec),
        concurrency=_convert(options, "concurrency", int, 4, spec),
        budget=_convert(options, "budget", int, None, spec),
        cache_dir=cache_dir,
    )
    return OpenAIJudge(
        spec,
        endpoint,
        template,
        mode,
        temperature=_convert(options, "temperature", float, 0.0, spec),
        max_tokens=_convert(options, "max_tokens", int, 8 if mode == "pairwise" else 4, spec),
        logprobs=_convert(options, "logprobs", bool, True, spec),
    )


register_backend("openai", _build)

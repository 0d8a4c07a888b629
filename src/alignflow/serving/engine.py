"""Engines behind the serving gateway: the builtin batched sampler and any OpenAI-compatible upstream.

An engine turns a :class:`GenRequest` (a completions prompt or chat messages, with sampling settings) into a
:class:`GenResult`, or a stream of :class:`StreamChunk` s. :func:`build_engine` makes one from a model entry
of ``deploy.yaml``.

**builtin** (:class:`BuiltinEngine`): a policy from the store (a checkpoint id, ``name@version`` or a model
folder) sampled with the rollout sampler, :func:`alignflow.rollout.generation.sample` (KV cache, the lean Llama
path where eligible). Prompts are built as ``alignflow generate`` builds them
(:func:`alignflow.data.prompts.encode_prompt`): a completions prompt is plain text after the tokenizer's bos;
chat messages are rendered with the tokenizer's chat template (generation prompt added, nothing prepended).
A tokenizer without a chat template gets a plain format, one ``"{role}: {content}\\n"`` line per message
followed by ``"assistant:"``, encoded as plain text.

Batching. Requests go onto an asyncio queue. A worker task takes the first waiting request, then collects
whatever else arrives within ``batch_window_ms`` of that request's arrival (up to ``max_batch``; requests that
queued while the previous decode ran are taken at once), and decodes the batch in a worker thread, so the event
loop keeps accepting requests meanwhile. Batches form at window boundaries only: a request arriving during a
decode waits for the next batch, because the rollout sampler runs one fixed batch to the end and offers no
hook between steps (joining between steps would need a second decode loop here, which we avoid: the sampling
arithmetic lives once).

The sampler takes one temperature and top-p per batch and draws from one generator for the whole batch, so
a collected batch is split into groups that can share a call:

- greedy requests (``temperature == 0``; their ``top_p`` and ``seed`` do not matter) all decode together;
  greedy decoding of a left-padded batch gives the same tokens as decoding each request alone (tested);
- sampled requests without a seed group by ``(temperature, top_p)`` and draw from the engine's generator;
- a sampled request with a ``seed`` decodes alone with a generator seeded by it, so the same request and seed
  give the same text whatever else is in flight (a batch mate would shift its random draws).

Within a group, ``max_tokens`` is per request: the group decodes to the largest and each row is cut at its own
limit (a row's first k tokens do not depend on how long the call runs). Stop strings are applied after
decoding: the text is cut before the earliest stop string, and ``completion_tokens`` counts the tokens needed
to produce the text up to it. ``completion_tokens`` includes the EOS token when one was sampled (as
``max_tokens`` does); ``finish_reason`` is ``"stop"`` at EOS or a stop string, ``"length"`` when ``max_tokens``
ran out first.

Streaming (builtin): the request is decoded in full, then streamed in token-sized deltas (one per generated
token that completes a character). True per-step streaming would need a callback inside the rollout sampler.

**upstream** (:class:`UpstreamEngine`): an OpenAI-compatible server (vLLM, TGI, another gateway) through the
official ``openai`` ``AsyncOpenAI`` client, chat and completions, streaming with ``stream=True`` (usage asked
for with ``stream_options.include_usage``; a server that sends none reports 0 tokens). The API key comes from an
``${ENV:NAME}`` reference and is never logged or put in an error. A 400/404/422 from upstream becomes
:class:`InvalidRequest`; any other failure (connection, timeout, 5xx, a malformed reply) :class:`EngineError`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from alignflow.errors import AlignflowError, ConfigError

if TYPE_CHECKING:
    from alignflow.store import Store

ROLES = ("system", "user", "assistant")
BUILTIN_KEYS = {"name", "engine", "ref", "version", "batch_window_ms", "max_batch", "dtype"}
UPSTREAM_KEYS = {"name", "engine", "url", "upstream_model", "api_key", "timeout", "max_retries", "version"}


@dataclass
class GenRequest:
    prompt: str | None = None  # /v1/completions: raw prompt text
    messages: list[dict[str, str]] | None = None  # /v1/chat/completions: OpenAI messages (role, content)
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass
class StreamChunk:
    delta: str  # new text since the previous chunk
    result: GenResult | None = None  # set on the last chunk only


class Engine(Protocol):
    version: (
        str  # the model version label the gateway reports (e.g. "support-policy@v3" or the checkpoint id)
    )

    async def generate(self, req: GenRequest) -> GenResult: ...

    def stream(self, req: GenRequest) -> AsyncIterator[StreamChunk]: ...

    async def aclose(self) -> None: ...


class EngineError(AlignflowError):
    """Generation failed on the engine's side (an upstream server down or misbehaving): the gateway's 502."""


class InvalidRequest(EngineError):
    """The request itself is wrong (empty prompt, bad max_tokens, malformed messages): the gateway's 400.
    ``param`` names the offending request field, as OpenAI error bodies do."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------------------------------------------------------------
# request checks shared by both engines


def message_text(content: Any, i: int) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise InvalidRequest(
                    f"messages[{i}].content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                    f"messages[{i}].content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequest(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}]")


def normalized_messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` as ``[{"role", "content"}]`` with string contents; ``developer`` (OpenAI's newer name for
    the system role) becomes ``system``, since chat templates know only the three classic roles."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {', '.join(ROLES)} (or developer); got {m.get('role')!r}",
                f"messages[{i}].role",
            )
        out.append({"role": role, "content": message_text(m.get("content"), i)})
    if not any(m["content"].strip() for m in out):
        raise InvalidRequest("messages: every message is empty", "messages")
    return out


def validate(req: GenRequest) -> None:
    """Raise :class:`InvalidRequest` for a request no engine can serve (the model's length limit is checked by
    the builtin engine, which knows it)."""
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("give exactly one of prompt (completions) or messages (chat)", "prompt")
    if req.prompt is not None and (not isinstance(req.prompt, str) or not req.prompt.strip()):
        raise InvalidRequest("prompt must be a non-empty string", "prompt")
    if req.messages is not None:
        normalized_messages(req.messages)
    if isinstance(req.max_tokens, bool) or not isinstance(req.max_tokens, int) or req.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be an integer >= 1, got {req.max_tokens!r}", "max_tokens")
    if not isinstance(req.temperature, int | float) or not 0 <= req.temperature <= 2:
        raise InvalidRequest(f"temperature must be in [0, 2], got {req.temperature!r}", "temperature")
    if not isinstance(req.top_p, int | float) or not 0 < req.top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {req.top_p!r}", "top_p")
    if req.seed is not None and (isinstance(req.seed, bool) or not isinstance(req.seed, int)):
        raise InvalidRequest(f"seed must be an integer, got {req.seed!r}", "seed")
    if req.stop is not None and (
        not isinstance(req.stop, list) or not all(isinstance(s, str) and s for s in req.stop)
    ):
        raise InvalidRequest("stop must be a list of non-empty strings", "stop")


def cut_at_stop(text: str, stop: Sequence[str] | None) -> int | None:
    """Index of the earliest stop string in ``text`` (None if none occurs)."""
    hits = [i for s in stop or () if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


# ---------------------------------------------------------------------------------------------------------------------
# builtin


@dataclass
class _Pending:
    """One queued request: its encoded prompt, its arrival time and the future its caller awaits."""

    req: GenRequest
    ids: list[int]
    arrived: float
    future: asyncio.Future[tuple[GenResult, list[int]]]


@dataclass
class EngineStats:
    """What the builtin engine did: ``batches`` (sampler calls), ``requests`` served, and each call's size."""

    batches: int = 0
    requests: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class BuiltinEngine:
    """A policy sampled in-process with request batching (see the module docstring).

    Build with :meth:`from_folder` (or :func:`build_engine`). ``stats`` counts decode batches. One engine
    serves one event loop at a time; used from another loop (e.g. a second ``asyncio.run``) it restarts its
    worker there.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        version: str,
        batch_window_ms: float = 10.0,
        max_batch: int = 16,
        seed: int | None = None,
    ) -> None:
        import torch

        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
        if batch_window_ms < 0:
            raise ConfigError(f"batch_window_ms must be >= 0, got {batch_window_ms}")
        self.model, self.tok, self.version = model.eval(), tokenizer, version
        self.batch_window = batch_window_ms / 1000.0
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        # Unseeded sampled requests draw from the engine's own stream, never the process-global RNG.
        self._rng = torch.Generator(device=self.device).manual_seed(
            seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        )
        self.stats = EngineStats()
        # One thread (made on first use): decodes run one after another, off the event loop.
        self._pool: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_folder(
        cls, path: str | os.PathLike[str], *, version: str, device: str = "cpu", **kw: Any
    ) -> BuiltinEngine:
        from alignflow.models import load_policy, load_tokenizer

        tok = load_tokenizer(path, padding_side="left")
        model = load_policy(path, dtype=kw.pop("dtype", "float32"), device=device)
        return cls(model, tok, version=version, **kw)

    def __repr__(self) -> str:
        return f"BuiltinEngine({self.version!r}, max_batch={self.max_batch})"

    # -- prompts ------------------------------------------------------------------------------------------------------

    def render(self, req: GenRequest) -> tuple[str, bool]:
        """``(prompt text, templated)`` as the policy sees it (see the module docstring)."""
        if req.prompt is not None:
            return req.prompt, False
        msgs = normalized_messages(req.messages)
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), True
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:", False

    def encode(self, req: GenRequest) -> list[int]:
        """The request's prompt ids, after validating it (including the model's length limit)."""
        from alignflow.data.prompts import encode_prompt

        validate(req)
        text, templated = self.render(req)
        ids = encode_prompt(self.tok, text, templated=templated)
        if not ids:
            raise InvalidRequest("the prompt encodes to no tokens", "prompt")
        if self.max_len is not None and len(ids) + req.max_tokens > self.max_len:
            raise InvalidRequest(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) exceeds the model's limit "
                f"of {self.max_len} tokens",
                "max_tokens",
            )
        return ids

    # -- batching -----------------------------------------------------------------------------------------------------

    async def generate(self, req: GenRequest) -> GenResult:
        result, _ = await self._submit(req)
        return result

    async def stream(self, req: GenRequest) -> AsyncIterator[StreamChunk]:
        """Decode in full, then yield one delta per token that completes a character; the deltas join to the
        result's text and the last chunk carries the result."""
        result, tokens = await self._submit(req)
        sent = ""
        for k in range(1, len(tokens)):
            text = self.tok.decode(tokens[:k], skip_special_tokens=True)
            # A token ending inside a multi-byte character decodes to U+FFFD: wait for the rest of it.
            if text.endswith("\ufffd") or len(text) <= len(sent) or not result.text.startswith(text):
                continue
            yield StreamChunk(text[len(sent) :])
            sent = text
        yield StreamChunk(result.text[len(sent) :], result)

    async def _submit(self, req: GenRequest) -> tuple[GenResult, list[int]]:
        ids = self.encode(req)
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"decode-{self.version[:16]}")
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._work(), name=f"batcher-{self.version[:16]}")
        fut: asyncio.Future[tuple[GenResult, list[int]]] = loop.create_future()
        assert self._queue is not None
        await self._queue.put(_Pending(req, ids, time.monotonic(), fut))
        return await fut

    async def _work(self) -> None:
        queue, pool = self._queue, self._pool
        assert queue is not None and pool is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = batch[0].arrived + self.batch_window
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), wait))
                except TimeoutError:
                    break
            live = [p for p in batch if not p.future.done()]  # a caller that went away is skipped
            for group in self._groups(live):
                try:
                    outs = await loop.run_in_executor(pool, self._decode, group)
                except Exception as exc:  # noqa: BLE001 - the callers see the failure; the worker lives on
                    err = EngineError(f"{self.version}: generation failed: {type(exc).__name__}: {exc}")
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(err)
                    continue
                for p, out in zip(group, outs, strict=True):
                    if not p.future.done():
                        p.future.set_result(out)

    @staticmethod
    def _groups(batch: list[_Pending]) -> list[list[_Pending]]:
        """Split a collected batch into sampler calls (see the module docstring)."""
        groups: dict[tuple[Any, ...], list[_Pending]] = {}
        for i, p in enumerate(batch):
            r = p.req
            if r.temperature == 0:
                key: tuple[Any, ...] = ("greedy",)
            elif r.seed is not None:
                key = ("seeded", i)
            else:
                key = ("sampled", float(r.temperature), float(r.top_p))
            groups.setdefault(key, []).append(p)
        return list(groups.values())

    def _decode(self, group: list[_Pending]) -> list[tuple[GenResult, list[int]]]:
        """One sampler call for ``group`` (run in the decode thread)."""
        import torch

        from alignflow.data.prompts import left_pad
        from alignflow.rollout.generation import sample

        first = group[0].req
        greedy = first.temperature == 0
        if not greedy and first.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(first.seed)
        else:
            generator = self._rng
        ids, mask = left_pad([p.ids for p in group], self.tok.pad_token_id, self.device)
        roll = sample(
            self.model,
            ids,
            mask,
            max_new_tokens=max(p.req.max_tokens for p in group),
            eos_token_id=self.tok.eos_token_id,
            pad_token_id=self.tok.pad_token_id,
            temperature=0.0 if greedy else float(first.temperature),
            top_p=1.0 if greedy else float(first.top_p),
            generator=generator,
        )
        self.stats.batches += 1
        self.stats.requests += len(group)
        self.stats.batch_sizes.append(len(group))
        out = []
        for p, row, row_mask in zip(group, roll.response_ids.cpu(), roll.response_mask.cpu(), strict=True):
            tokens = row[row_mask.bool()].tolist()[: p.req.max_tokens]
            out.append(self._finish(p, tokens))
        return out

    def _finish(self, p: _Pending, tokens: list[int]) -> tuple[GenResult, list[int]]:
        """The result of one row: EOS, stop strings and max_tokens decide its end."""
        eos = self.tok.eos_token_id
        hit_eos = bool(tokens) and tokens[-1] == eos
        body = tokens[:-1] if hit_eos else tokens
        text = self.tok.decode(body, skip_special_tokens=True)
        cut = cut_at_stop(text, p.req.stop)
        if cut is not None:
            text = text[:cut]
            # The fewest tokens whose text reaches the stop string: what the model had to generate.
            k = next(
                k
                for k in range(1, len(body) + 1)
                if cut_at_stop(self.tok.decode(body[:k], skip_special_tokens=True), p.req.stop) is not None
            )
            tokens, reason = body[:k], "stop"
        else:
            reason = "stop" if hit_eos else "length"
        return GenResult(text, len(p.ids), len(tokens), reason), tokens

    async def aclose(self) -> None:
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._worker = None
        if self._pool is not None:  # a later request makes a new one: aclose ends the serving, not the engine
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


# ---------------------------------------------------------------------------------------------------------------------
# upstream


class UpstreamEngine:
    """An OpenAI-compatible server as an engine (see the module docstring). ``api_key`` is an
    ``${ENV:NAME}`` reference, or None for a server that needs none."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
        version: str | None = None,
    ) -> None:
        import openai

        from alignflow.judges.base import JudgeError
        from alignflow.judges.openai import resolve_key

        self.url, self.model = url, model
        self.version = version or f"{model}@{url}"
        self.where = f"upstream {model}@{url}"
        if timeout <= 0 or max_retries < 0:
            raise ConfigError(f"{self.where}: timeout must be > 0 and max_retries >= 0")
        try:
            # vLLM and TGI accept any key when they are started without one; the client insists on a value.
            self._key = resolve_key(api_key, self.where) if api_key is not None else "none"
        except JudgeError as exc:
            raise ConfigError(str(exc)) from None
        self.client = openai.AsyncOpenAI(
            base_url=url, api_key=self._key, timeout=timeout, max_retries=max_retries
        )

    def __repr__(self) -> str:  # no key, ever
        return f"UpstreamEngine({self.model!r}, {self.url!r})"

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key and self._key != "none" else text

    def _error(self, exc: Exception) -> EngineError:
        import openai

        if isinstance(exc, openai.APIStatusError) and exc.status_code in (400, 404, 422):
            return InvalidRequest(self._scrub(f"{self.where}: {exc.status_code}: {exc.message}"))
        if isinstance(exc, openai.APIStatusError):
            return EngineError(self._scrub(f"{self.where}: HTTP {exc.status_code}: {exc.message}"))
        if isinstance(exc, openai.APITimeoutError):
            return EngineError(f"{self.where}: timed out")
        if isinstance(exc, openai.APIConnectionError):
            return EngineError(f"{self.where}: cannot connect: {self._scrub(str(exc))}")
        return EngineError(self._scrub(f"{self.where}: {type(exc).__name__}: {exc}"))

    def _args(self, req: GenRequest, stream: bool) -> dict[str, Any]:
        validate(req)
        args: dict[str, Any] = {
            "model": self.model,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
        }
        if req.seed is not None:
            args["seed"] = req.seed
        if req.stop:
            args["stop"] = list(req.stop)
        if req.messages is not None:
            args["messages"] = normalized_messages(req.messages)
        else:
            args["prompt"] = req.prompt
        if stream:
            args |= {"stream": True, "stream_options": {"include_usage": True}}
        return args

    @staticmethod
    def _reason(finish: str | None) -> str:
        return "length" if finish == "length" else "stop"

    async def generate(self, req: GenRequest) -> GenResult:
        args = self._args(req, stream=False)
        try:
            if "messages" in args:
                resp = await self.client.chat.completions.create(**args)
            else:
                resp = await self.client.completions.create(**args)
        except Exception as exc:  # noqa: BLE001 - every upstream failure is the gateway's 502 (or 400)
            raise self._error(exc) from None
        choices = getattr(resp, "choices", None)
        if not choices:
            raise EngineError(f"{self.where}: the reply has no choices")
        choice = choices[0]
        text = choice.message.content if "messages" in args else choice.text
        if not isinstance(text, str):
            raise EngineError(f"{self.where}: the reply's first choice has no text")
        usage = resp.usage
        return GenResult(
            text,
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
            self._reason(choice.finish_reason),
        )

    async def stream(self, req: GenRequest) -> AsyncIterator[StreamChunk]:
        args = self._args(req, stream=True)
        chat = "messages" in args
        parts: list[str] = []
        finish, usage = None, None
        try:
            if chat:
                events = await self.client.chat.completions.create(**args)
            else:
                events = await self.client.completions.create(**args)
            async for ev in events:
                if ev.usage is not None:
                    usage = ev.usage
                for choice in ev.choices or ():
                    delta = (choice.delta.content if chat else choice.text) or ""
                    finish = choice.finish_reason or finish
                    if delta:
                        parts.append(delta)
                        yield StreamChunk(delta)
        except Exception as exc:  # noqa: BLE001 - as in generate
            raise self._error(exc) from None
        result = GenResult(
            "".join(parts),
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
            self._reason(finish),
        )
        yield StreamChunk("", result)

    async def aclose(self) -> None:
        await self.client.close()


# ---------------------------------------------------------------------------------------------------------------------
# from deploy.yaml


def _check_keys(spec: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(k for k, v in spec.items() if k not in allowed and v is not None)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}"
        )


def build_engine(spec: dict[str, Any], store: Store | None, device: str = "cpu") -> Engine:
    """The engine for one model entry of ``deploy.yaml``.

    ``{"name", "engine": "builtin", "ref": <checkpoint id | name@version | folder>, "batch_window_ms": 10,
    "max_batch": 16}``: the version label is ``ref`` itself when it names a version (``name@v3``), else the
    artifact id (a folder is stored, or found in the store, when a store is given; without one it is loaded
    as is and labelled by its folder name). ``{"name", "engine": "upstream", "url", "upstream_model",
    "api_key": "${ENV:NAME}", "timeout": 60, "max_retries": 2}``: labelled ``upstream_model@url``. Either may
    set ``version`` to override the label.
    """
    where = f"model {spec.get('name', '?')!r}"
    kind = spec.get("engine") or "builtin"
    if kind == "upstream":
        _check_keys(spec, UPSTREAM_KEYS, where)
        if not spec.get("url") or not spec.get("upstream_model"):
            raise ConfigError(f"{where}: an upstream engine needs url and upstream_model")
        return UpstreamEngine(
            str(spec["url"]),
            str(spec["upstream_model"]),
            api_key=spec.get("api_key"),
            timeout=float(spec.get("timeout") or 60.0),
            max_retries=int(spec["max_retries"]) if spec.get("max_retries") is not None else 2,
            version=spec.get("version"),
        )
    if kind != "builtin":
        raise ConfigError(f"{where}: engine must be 'builtin' or 'upstream', got {kind!r}")
    _check_keys(spec, BUILTIN_KEYS, where)
    ref = spec.get("ref")
    if not ref:
        raise ConfigError(
            f"{where}: a builtin engine needs ref (a checkpoint id, name@version or model folder)"
        )
    ref = str(ref)
    if store is not None:
        from alignflow.rollout.generations import resolve_model_folder

        path, artifact_id, _ = resolve_model_folder(store, ref, f"{where}: ref")
        label = ref if "@" in ref else artifact_id
    else:
        path = Path(ref)
        if not path.is_dir():
            raise ConfigError(f"{where}: ref {ref!r}: without a store, ref must be a model folder")
        label = path.name
    return BuiltinEngine.from_folder(
        path,
        version=str(spec.get("version") or label),
        device=device,
        dtype=spec.get("dtype") or "float32",
        batch_window_ms=float(spec["batch_window_ms"]) if spec.get("batch_window_ms") is not None else 10.0,
        max_batch=int(spec["max_batch"]) if spec.get("max_batch") is not None else 16,
    )


__all__ = [
    "BuiltinEngine",
    "Engine",
    "EngineError",
    "EngineStats",
    "GenRequest",
    "GenResult",
    "InvalidRequest",
    "StreamChunk",
    "UpstreamEngine",
    "build_engine",
    "normalized_messages",
    "validate",
]

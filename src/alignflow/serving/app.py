"""The OpenAI-compatible gateway: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/healthz`, `/metrics`
and the feedback router (`POST /v1/feedback`), over the engines of a `DeployConfig`.

- Every `/v1` route needs `Authorization: Bearer <key>` (`deps.require_key`: hashed keys, per-key rate limit).
  `/healthz` and `/metrics` are open, for probes and scrapers; bind the gateway to a private interface or put
  a proxy in front if the metrics should not be public.
- The request's `model` names a model (served directly) or an experiment (`experiments.Router` picks an arm).
  Every completion names what served it: headers `X-Alignflow-Model-Version` (always), `X-Alignflow-Arm` and
  `X-Alignflow-Experiment` (when routed through an experiment), and the body's extra top-level field
  `"alignflow": {"model", "version", "arm", "experiment"}` (the `openai` client keeps it in `model_extra`).
- `stream: true` sends Server-Sent Events, `data: {chunk}\\n\\n` ... `data: [DONE]\\n\\n`. The first chunk is
  awaited before the response starts, so a request the engine refuses still gets a 400 (or 502), not a 200
  stream; an engine failure after that arrives as a `data: {"error": {...}}` event (the client raises it).
- Errors are OpenAI-style, `{"error": {"message", "type", "param", "code"}}`, for every status, including
  FastAPI's request validation (422), unknown routes (404) and oversized bodies (413).
- With `logging.enabled`, each completion is recorded (`logs.record_response`) under the `id` the client gets.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignflow.errors import ConfigError
from alignflow.feedback.app import BodyLimit
from alignflow.feedback.services.errors import ServiceError
from alignflow.serving import engine as eng
from alignflow.serving.config import DeployConfig
from alignflow.serving.deps import ERROR_TYPES, ApiError, KeyDep
from alignflow.serving.experiments import Route, Router, UnknownModel
from alignflow.serving.keys import RateLimiter
from alignflow.serving.metrics import GatewayMetrics
from alignflow.store import Store, db

log = logging.getLogger(__name__)

TAG_HEADER = "x-alignflow-tag-"
MAX_TEXT = 200_000  # characters per message or prompt; the byte limit usually binds first


# --------------------------------------------------------------------------------------------- request schemas


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(max_length=MAX_TEXT)
    name: str | None = Field(default=None, max_length=64)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(min_length=1, max_length=128, description="A model or an experiment of the gateway.")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Capped by the gateway's limits.max_tokens."
    )
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 decodes greedily.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(default=None, max_length=4)
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(
        default=None, max_length=256, description="Sticky arm assignment (else X-User-Id)."
    )
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="OpenAI's newer max_tokens.")


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT)


# -------------------------------------------------------------------------------------------- response schemas


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AlignflowInfo(BaseModel):
    """What served the request: the deploy.yaml model, its version label, the arm and experiment (or null)."""

    model: str
    version: str
    arm: str | None
    experiment: str | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    alignflow: AlignflowInfo


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    alignflow: AlignflowInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "alignflow"
    alignflow: dict[str, Any] = Field(description="kind (model | experiment), version or arms.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorBody, "description": ERROR_TYPES.get(c, "error")} for c in codes}


SSE = {"text/event-stream": {"schema": {"type": "string"}, "example": "data: {...}\n\ndata: [DONE]\n\n"}}
COMPLETION_ERRORS = _errors(400, 401, 404, 413, 422, 429, 502)


# -------------------------------------------------------------------------------------------------- middleware


class _OpenAIBodyLimit(BodyLimit):
    """The annotation platform's body limit (by header or while streaming), with an OpenAI-style 413 body."""

    async def _reject(self, send: Callable) -> None:
        body = ApiError(413, f"request body larger than {self.limit} bytes", code="request_too_large").body()
        start = {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
        await send(start)
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def _endpoint(path: str) -> str | None:
    """The metrics label for a path: /v1 routes by template, anything else under /v1 as "other"."""
    if path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/feedback"):
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other" if path.startswith("/v1") else None


class _CountRequests:
    """ASGI middleware: counts each /v1 request (and each error status) once its status is known; the route's
    labels come from the request state the handler filled in (`_route_labels`)."""

    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        endpoint = _endpoint(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # shared with `request.state` downstream
        status = 500

        async def watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = state.get("route_labels", ("", "", ""))
            self.metrics.request(endpoint, route, status)
            if status >= 400:
                kind = state.get("error_type") or ERROR_TYPES.get(status, "error")
                self.metrics.error(endpoint, route, status, kind)


# -------------------------------------------------------------------------------------------------------- app


class Gateway:
    """The state behind the routes: config, engines, router, metrics, database sessions (the rate limiter is
    `app.state.limiter`, where `deps.require_key` finds it)."""

    def __init__(self, config: DeployConfig, store: Store, engines: dict[str, eng.Engine]) -> None:
        self.config = config
        self.store = store
        self.engines = engines
        self.router = Router(config)
        self.metrics = GatewayMetrics()
        self.sessions = db.session_factory(store.engine)
        self.started = int(time.time())

    def version(self, model: str) -> str:
        return self.engines[model].version

    def route(self, request: Request, body: _Sampling) -> tuple[Route, str | None, dict[str, str]]:
        user = body.user or request.headers.get("x-user-id") or None
        tags = {k[len(TAG_HEADER) :]: v for k, v in request.headers.items() if k.startswith(TAG_HEADER)}
        try:
            route = self.router.route(body.model, user, body.model_dump(), tags)
        except UnknownModel:
            raise ApiError(
                404,
                f"the model {body.model!r} does not exist (see GET /v1/models)",
                param="model",
                code="model_not_found",
            ) from None
        request.state.route_labels = (route.model, self.version(route.model), route.arm or "")
        logged_tags = {**{f"metadata.{k}": v for k, v in (body.metadata or {}).items()}, **tags}
        return route, user, logged_tags

    def gen_request(self, body: ChatCompletionRequest | CompletionRequest) -> eng.GenRequest:
        limits = self.config.limits
        asked = body.max_tokens
        if isinstance(body, ChatCompletionRequest) and asked is None:
            asked = body.max_completion_tokens
        if asked is not None and asked > limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens {asked} exceeds this gateway's limit of {limits.max_tokens}",
                param="max_tokens",
                code="max_tokens_exceeded",
            )
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        common: dict[str, Any] = {
            "max_tokens": asked or limits.default_max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "seed": body.seed,
            "stop": stop or None,
        }
        if isinstance(body, ChatCompletionRequest):
            messages = [m.model_dump(exclude_none=True, exclude={"name"}) for m in body.messages]
            return eng.GenRequest(messages=messages, **common)
        return eng.GenRequest(prompt=body.prompt, **common)

    def headers(self, route: Route) -> dict[str, str]:
        out = {"X-Alignflow-Model-Version": self.version(route.model)}
        if route.arm is not None:
            out["X-Alignflow-Arm"] = route.arm
        if route.experiment is not None:
            out["X-Alignflow-Experiment"] = route.experiment
        return out

    def info(self, route: Route) -> AlignflowInfo:
        return AlignflowInfo(
            model=route.model, version=self.version(route.model), arm=route.arm, experiment=route.experiment
        )

    def finish(
        self,
        endpoint: str,
        route: Route,
        started: float,
        result: eng.GenResult,
        *,
        request_id: str,
        user: str | None,
        gen: eng.GenRequest,
        key_id: int,
        tags: dict[str, str],
    ) -> None:
        """Metrics and (opt-in) logging of one finished completion; runs in a worker thread."""
        seconds = time.perf_counter() - started
        version = self.version(route.model)
        self.metrics.completion(
            endpoint, route.model, version, route.arm, seconds, result.prompt_tokens, result.completion_tokens
        )
        if not self.config.logging.enabled:
            return
        from alignflow.serving.logs import record_response

        messages = eng.normalized_messages(gen.messages) if gen.messages is not None else None
        prompt = (
            gen.prompt if messages is None else "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        )
        try:
            with self.sessions() as s:
                record_response(
                    s,
                    request_id=request_id,
                    model=route.model,
                    version=version,
                    arm=route.arm,
                    experiment=route.experiment,
                    user=user,
                    prompt=prompt or "",
                    messages=messages,
                    response=result.text,
                    prompt_tokens=result.prompt_tokens,
                    completion_tokens=result.completion_tokens,
                    latency_ms=seconds * 1000.0,
                    key_id=key_id,
                    tags=tags,
                )
        except Exception:  # the client already has its answer; a failed log must not turn it into an error
            log.exception("could not log response %s", request_id)

    async def complete(
        self,
        request: Request,
        response: Response,
        key_id: int,
        body: ChatCompletionRequest | CompletionRequest,
    ) -> ChatCompletion | Completion | StreamingResponse:
        started = time.perf_counter()
        chat = isinstance(body, ChatCompletionRequest)
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        route, user, tags = self.route(request, body)
        gen = self.gen_request(body)
        engine = self.engines[route.model]
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        headers = self.headers(route)
        info = self.info(route)
        done = dict(request_id=request_id, user=user, gen=gen, key_id=key_id, tags=tags)
        if body.stream:
            stream = engine.stream(gen)
            try:
                first = await anext(stream)  # refusals surface here, before the 200 is sent
            except eng.EngineError as exc:
                raise _engine_error(exc) from None
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._events(
                stream,
                first,
                chat=chat,
                request_id=request_id,
                created=created,
                route=route,
                info=info,
                include_usage=include_usage,
                endpoint=endpoint,
                started=started,
                done=done,
            )
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        try:
            result = await engine.generate(gen)
        except eng.EngineError as exc:
            raise _engine_error(exc) from None
        await run_in_threadpool(self.finish, endpoint, route, started, result, **done)
        response.headers.update(headers)
        usage = _usage(result)
        reason = _reason(result)
        if chat:
            choice = ChatChoice(index=0, message=AssistantMessage(content=result.text), finish_reason=reason)
            return ChatCompletion(
                id=request_id,
                created=created,
                model=route.model,
                choices=[choice],
                usage=usage,
                alignflow=info,
            )
        choice_c = CompletionChoice(index=0, text=result.text, finish_reason=reason)
        return Completion(
            id=request_id, created=created, model=route.model, choices=[choice_c], usage=usage, alignflow=info
        )

    async def _events(
        self,
        stream: AsyncIterator[eng.StreamChunk],
        first: eng.StreamChunk,
        *,
        chat: bool,
        request_id: str,
        created: int,
        route: Route,
        info: AlignflowInfo,
        include_usage: bool,
        endpoint: str,
        started: float,
        done: dict[str, Any],
    ) -> AsyncIterator[str]:
        base = {
            "id": request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": route.model,
            "alignflow": info.model_dump(),
        }

        def event(choice: dict[str, Any] | None, usage: Usage | None = None) -> str:
            payload = {**base, "choices": [] if choice is None else [choice]}
            if usage is not None:
                payload["usage"] = usage.model_dump()
            return f"data: {json.dumps(payload)}\n\n"

        def delta(text: str, finish: str | None = None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if chat:  # OpenAI's first chat chunk carries the role
            yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        chunk: eng.StreamChunk | None = first
        try:
            while chunk is not None:
                if chunk.result is not None:
                    result = chunk.result
                    if chunk.delta:
                        yield event(delta(chunk.delta))
                    yield event(delta("", _reason(result)))
                    if include_usage:
                        yield event(None, _usage(result))
                    yield "data: [DONE]\n\n"
                    await run_in_threadpool(self.finish, endpoint, route, started, result, **done)
                    return
                if chunk.delta:
                    yield event(delta(chunk.delta))
                chunk = await anext(stream, None)
            raise eng.EngineError("the engine's stream ended without a final result")
        except eng.EngineError as exc:
            err = _engine_error(exc)
            labels = (route.model, self.version(route.model), route.arm or "")
            self.metrics.error(endpoint, labels, err.status, err.type)
            yield f"data: {json.dumps(err.body())}\n\n"


def _usage(result: eng.GenResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


def _reason(result: eng.GenResult) -> Literal["stop", "length"]:
    return "length" if result.finish_reason == "length" else "stop"


def _engine_error(exc: eng.EngineError) -> ApiError:
    if isinstance(exc, eng.InvalidRequest):
        return ApiError(400, str(exc), param=exc.param, code="invalid_request")
    return ApiError(502, f"the model's engine failed: {exc}", code="engine_error")


def _json_error(request: Request, err: ApiError) -> JSONResponse:
    request.state.error_type = err.type
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def make_app(config: DeployConfig, store: Store, engines: dict[str, eng.Engine] | None = None) -> FastAPI:
    """The gateway app over `config`'s models. `engines` supplies ready engines by model name (tests and
    benchmarks); the others are built with `engine.build_engine` on `store` and `config.device`, and closed
    when the app shuts down. Database sessions come from `store.engine` (see `deps.py`)."""
    from alignflow.serving.feedback import router as feedback_router

    given = dict(engines or {})
    unknown = sorted(set(given) - {m.name for m in config.models})
    if unknown:
        raise ConfigError(f"engines given for models not in the config: {', '.join(unknown)}")
    built: dict[str, eng.Engine] = {}
    for spec in config.engine_specs():
        if spec["name"] not in given:
            built[spec["name"]] = eng.build_engine(spec, store, config.device)
    gw = Gateway(config, store, {**given, **built})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for engine in built.values():  # engines handed in belong to the caller
            await engine.aclose()

    app = FastAPI(
        title="alignflow gateway",
        version="1",
        description="OpenAI-compatible completions over alignflow policy versions, with experiments.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI would load its JS from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.state.gateway = gw
    app.state.sessions = gw.sessions
    app.state.limiter = RateLimiter(config.limits.rate_per_minute)
    app.add_middleware(_OpenAIBodyLimit, limit=config.limits.max_request_bytes)
    app.add_middleware(_CountRequests, metrics=gw.metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _json_error(request, exc)

    @app.exception_handler(eng.EngineError)
    async def engine_error(request: Request, exc: eng.EngineError) -> JSONResponse:
        return _json_error(request, _engine_error(exc))

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _json_error(request, ApiError(exc.status, str(exc), param=exc.field))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
        more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
        return _json_error(request, ApiError(422, f"{loc}: {msg}{more}", param=loc, code=err.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return _json_error(request, err)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={200: {"content": SSE}, **COMPLETION_ERRORS},
        summary="Chat completion (OpenAI-compatible; stream: true for SSE)",
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, response: Response, key: KeyDep
    ):
        return await gw.complete(request, response, key.id, body)

    @app.post(
        "/v1/completions",
        response_model=Completion,
        responses={200: {"content": SSE}, **COMPLETION_ERRORS},
        summary="Text completion (OpenAI-compatible; stream: true for SSE)",
    )
    async def completions(body: CompletionRequest, request: Request, response: Response, key: KeyDep):
        return await gw.complete(request, response, key.id, body)

    def card(name: str) -> ModelCard:
        if name in gw.engines:
            return ModelCard(
                id=name, created=gw.started, alignflow={"kind": "model", "version": gw.version(name)}
            )
        exp = next(e for e in config.experiments if e.name == name)
        arms = [
            {"name": a.name, "model": a.model, "weight": a.weight, "version": gw.version(a.model)}
            for a in exp.arms
        ]
        return ModelCard(id=name, created=gw.started, alignflow={"kind": "experiment", "arms": arms})

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401, 429))
    async def list_models(key: KeyDep) -> ModelList:
        names = [m.name for m in config.models] + [e.name for e in config.experiments]
        return ModelList(data=[card(n) for n in names])

    @app.get("/v1/models/{model}", response_model=ModelCard, responses=_errors(401, 404, 429))
    async def get_model(model: str, key: KeyDep) -> ModelCard:
        if model not in gw.engines and model not in gw.router.experiments:
            raise ApiError(404, f"the model {model!r} does not exist", param="model", code="model_not_found")
        return card(model)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": {name: e.version for name, e in gw.engines.items()}}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type=gw.metrics.content_type)

    # The gateway's own refusals (key, rate limit, body size, validation) apply to the feedback route too.
    app.include_router(feedback_router, responses=_errors(400, 401, 404, 413, 422, 429))
    return app

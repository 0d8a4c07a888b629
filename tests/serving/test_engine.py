"""Serving engines through their public interface: the builtin batched engine on tiny Llamas, and the
upstream engine against a fake OpenAI-compatible server (``alignflow.judges.testing``) and a test-local one
for ``/v1/completions`` and streaming, which the judges' fake does not serve."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import Request

from alignflow.data.prompts import encode_prompt, left_pad
from alignflow.errors import ConfigError
from alignflow.judges.testing import free_socket, serve_app
from alignflow.models import load_policy, load_tokenizer, make_tiny_model_dir
from alignflow.rollout.generation import sample
from alignflow.serving.engine import (
    BuiltinEngine,
    EngineError,
    GenRequest,
    GenResult,
    InvalidRequest,
    UpstreamEngine,
    build_engine,
)

PROMPTS = [
    "Hello there",
    "The model asked a short poem quickly.",
    "x",
    "Why? Please help. Numbers: 3, 14",
    "My friend fixed the recipe again. Thanks!",
    "Is that correct?",
]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "policy", vocab_size=400)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Any:
    return load_tokenizer(model_dir, padding_side="left")


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Any:
    """The tiny Llama with EOS made likely: EOS's output row is twice the row of the token the random model
    emits most under greedy decoding, so greedy rows end at EOS after varied lengths (the first time they
    would have emitted that token with a positive logit), as a trained policy's replies do."""
    net = load_policy(model_dir, dtype="float32").eval()
    tk = load_tokenizer(model_dir, padding_side="left")
    counts: dict[int, int] = {}
    for p in PROMPTS:
        for t in _alone(net, tk, encode_prompt(tk, p), 16):
            counts[t] = counts.get(t, 0) + 1
    common = max(counts, key=lambda t: counts[t])
    with torch.no_grad():
        net.lm_head.weight[tk.eos_token_id] = 2 * net.lm_head.weight[common]
    return net


def _alone(net: Any, tk: Any, ids: list[int], n: int) -> list[int]:
    """Greedy tokens of one prompt decoded by itself with the rollout sampler (EOS included)."""
    pid, mask = left_pad([ids], tk.pad_token_id, "cpu")
    roll = sample(
        net,
        pid,
        mask,
        max_new_tokens=n,
        eos_token_id=tk.eos_token_id,
        pad_token_id=tk.pad_token_id,
        temperature=0,
    )
    return roll.response_ids[0][roll.response_mask[0].bool()].tolist()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def _served(engine: BuiltinEngine, reqs: list[GenRequest]) -> list[GenResult]:
    try:
        return await asyncio.gather(*(engine.generate(r) for r in reqs))
    finally:
        await engine.aclose()


# ---------------------------------------------------------------------------------------------------------------------
# builtin: batching


def test_batched_greedy_equals_one_at_a_time_and_the_rollout_sampler(model: Any, tok: Any) -> None:
    reqs = [GenRequest(prompt=p, max_tokens=6 + 3 * i, temperature=0, seed=i) for i, p in enumerate(PROMPTS)]
    reqs.append(
        GenRequest(messages=[{"role": "user", "content": "Why? Please help."}], max_tokens=20, temperature=0)
    )
    batched = BuiltinEngine(model, tok, version="t", batch_window_ms=200, max_batch=16)
    got = run(_served(batched, reqs))
    assert batched.stats.batches == 1 and batched.stats.batch_sizes == [
        len(reqs)
    ]  # seeds do not split greedy
    single = BuiltinEngine(model, tok, version="t", max_batch=1)
    alone = [run(_served(single, [r]))[0] for r in reqs]
    assert got == alone
    reasons = {g.finish_reason for g in got}
    assert reasons == {"stop", "length"}, "the batch should mix rows ending at EOS and at max_tokens"
    for r, g in zip(reqs, got, strict=True):
        if r.prompt is not None:
            ids = encode_prompt(tok, r.prompt)
        else:
            text = tok.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
            ids = encode_prompt(tok, text, templated=True)
        tokens = _alone(model, tok, ids, r.max_tokens)  # token-for-token what the engine returned
        eos = bool(tokens) and tokens[-1] == tok.eos_token_id
        assert g.prompt_tokens == len(ids)
        assert g.completion_tokens == len(tokens) <= r.max_tokens
        assert g.text == tok.decode(tokens[:-1] if eos else tokens, skip_special_tokens=True)
        assert g.finish_reason == ("stop" if eos else "length")
        assert (g.completion_tokens == r.max_tokens) or eos


def test_a_burst_is_served_in_fewer_batches_than_requests_and_max_batch_caps_them(
    model: Any, tok: Any
) -> None:
    reqs = [GenRequest(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=8, temperature=0.8) for i in range(12)]
    engine = BuiltinEngine(model, tok, version="t", batch_window_ms=200, max_batch=16, seed=0)
    out = run(_served(engine, reqs))
    assert len(out) == 12 and engine.stats.batches == 1 and engine.stats.requests == 12
    capped = BuiltinEngine(model, tok, version="t", batch_window_ms=200, max_batch=5, seed=0)
    run(_served(capped, reqs))
    assert capped.stats.batch_sizes == [5, 5, 2]


def test_sampling_settings_split_a_batch_into_groups(model: Any, tok: Any) -> None:
    reqs = [
        GenRequest(prompt="Hello", max_tokens=4, temperature=0),
        GenRequest(prompt="Hello", max_tokens=4, temperature=0, top_p=0.5),  # greedy: top_p is moot
        GenRequest(prompt="Hello", max_tokens=4, temperature=0.7),
        GenRequest(prompt="Hi", max_tokens=4, temperature=0.7),
        GenRequest(prompt="Hello", max_tokens=4, temperature=0.7, top_p=0.9),
        GenRequest(prompt="Hello", max_tokens=4, temperature=0.7, seed=1),  # seeded: alone
        GenRequest(prompt="Hello", max_tokens=4, temperature=0.7, seed=1),
    ]
    engine = BuiltinEngine(model, tok, version="t", batch_window_ms=200, seed=0)
    run(_served(engine, reqs))
    assert sorted(engine.stats.batch_sizes) == [1, 1, 1, 2, 2]


def test_requests_arriving_during_a_decode_form_the_next_batch(model: Any, tok: Any) -> None:
    engine = BuiltinEngine(model, tok, version="t", batch_window_ms=0, max_batch=16)

    async def main() -> None:
        first = asyncio.ensure_future(
            engine.generate(GenRequest(prompt="Hello", max_tokens=150, temperature=0))
        )
        await asyncio.sleep(0.02)  # the first decode is running
        rest = [GenRequest(prompt=p, max_tokens=5, temperature=0) for p in PROMPTS]
        await asyncio.gather(first, *(engine.generate(r) for r in rest))
        await engine.aclose()

    run(main())
    assert engine.stats.batch_sizes == [1, len(PROMPTS)]


def test_the_event_loop_keeps_running_while_a_batch_decodes(model: Any, tok: Any) -> None:
    engine = BuiltinEngine(model, tok, version="t", batch_window_ms=0)
    decode = engine._decode

    def slow_decode(group: Any) -> Any:
        # A sampled reply may meet EOS within a few tokens; a fixed blocking delay in the decode thread makes the
        # batch last long enough for the check to mean something, whatever the sample and the machine's load.
        time.sleep(0.3)
        return decode(group)

    engine._decode = slow_decode  # type: ignore[method-assign]
    ticks: list[float] = []

    async def main() -> float:
        job = asyncio.ensure_future(
            engine.generate(GenRequest(prompt="Hello", max_tokens=300, temperature=0.5))
        )
        t0 = time.perf_counter()
        while not job.done():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.002)
        await engine.aclose()
        return time.perf_counter() - t0

    seconds = run(main())
    assert seconds >= 0.3
    assert len(ticks) >= 5  # the loop ticked (every 2 ms) during the 0.3 s the decode thread blocked


# ---------------------------------------------------------------------------------------------------------------------
# builtin: request semantics


def test_max_tokens_stops_with_length(model: Any, tok: Any) -> None:
    # a prompt whose greedy reply runs past 3 tokens without EOS
    prompt = next(p for p in PROMPTS if len(_alone(model, tok, encode_prompt(tok, p), 4)) == 4)
    out = run(
        _served(
            BuiltinEngine(model, tok, version="t"), [GenRequest(prompt=prompt, max_tokens=3, temperature=0)]
        )
    )
    assert (out[0].completion_tokens, out[0].finish_reason) == (3, "length")


def test_stop_strings_cut_the_text_before_the_earliest_one(model: Any, tok: Any) -> None:
    engine = BuiltinEngine(model, tok, version="t")
    prompt = max(
        PROMPTS,
        key=lambda p: len(run(_served(engine, [GenRequest(prompt=p, max_tokens=30, temperature=0)]))[0].text),
    )
    full = run(_served(engine, [GenRequest(prompt=prompt, max_tokens=30, temperature=0)]))[0]
    assert len(full.text) >= 8
    late, early = full.text[5:7], full.text[2:4]
    if "\ufffd" in late + early:
        pytest.skip("the random model's text has partial characters there")
    out = run(_served(engine, [GenRequest(prompt=prompt, max_tokens=30, temperature=0, stop=[late, early])]))[
        0
    ]
    cut = min(full.text.find(late), full.text.find(early))
    assert out.text == full.text[:cut] and out.finish_reason == "stop"
    assert 1 <= out.completion_tokens < full.completion_tokens
    # the tokens counted are the fewest that produce the stop string
    ids = _alone(model, tok, encode_prompt(tok, prompt), 30)
    reach = [
        k
        for k in range(1, len(ids) + 1)
        if any(s in tok.decode(ids[:k], skip_special_tokens=True) for s in (late, early))
    ]
    assert out.completion_tokens == reach[0]
    never = run(
        _served(engine, [GenRequest(prompt=prompt, max_tokens=30, temperature=0, stop=["\x00never"])])
    )[0]
    assert never == full


def test_seeded_sampling_is_reproducible_whatever_else_is_in_flight(model: Any, tok: Any) -> None:
    req = GenRequest(prompt="Hello there", max_tokens=24, temperature=1.0, seed=5)
    alone = run(_served(BuiltinEngine(model, tok, version="t"), [req]))[0]
    others = [GenRequest(prompt=p, max_tokens=24, temperature=1.0) for p in PROMPTS]
    crowd = run(_served(BuiltinEngine(model, tok, version="t", batch_window_ms=100), [*others, req, *others]))
    assert crowd[len(others)] == alone
    seeds = [
        run(
            _served(
                BuiltinEngine(model, tok, version="t"),
                [GenRequest(prompt="Hello there", max_tokens=24, seed=s)],
            )
        )[0].text
        for s in (1, 2, 3)
    ]
    assert len({*seeds, alone.text}) > 1, "different seeds should give different samples"


def test_chat_without_a_template_uses_the_plain_format(model_dir: Path, model: Any) -> None:
    plain = load_tokenizer(model_dir, padding_side="left")
    plain.chat_template = None
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = run(
        _served(
            BuiltinEngine(model, plain, version="t"), [GenRequest(messages=msgs, max_tokens=5, temperature=0)]
        )
    )[0]
    ids = encode_prompt(plain, "system: Be brief.\nuser: Hi\nassistant:")
    assert out.prompt_tokens == len(ids)
    tokens = _alone(model, plain, ids, 5)
    assert out.completion_tokens == len(tokens)


def test_stream_deltas_join_to_the_result(model: Any, tok: Any) -> None:
    engine = BuiltinEngine(model, tok, version="t")
    prompt = max(PROMPTS, key=lambda p: len(_alone(model, tok, encode_prompt(tok, p), 20)))
    req = GenRequest(prompt=prompt, max_tokens=20, temperature=0)

    async def main() -> tuple[list[Any], GenResult]:
        chunks = [c async for c in engine.stream(req)]
        whole = await engine.generate(req)
        await engine.aclose()
        return chunks, whole

    chunks, whole = run(main())
    assert [c.result is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].result == whole and "".join(c.delta for c in chunks) == whole.text
    assert len(chunks) >= 4  # token-sized, not one blob


@pytest.mark.parametrize(
    ("req", "param"),
    [
        (GenRequest(prompt=""), "prompt"),
        (GenRequest(prompt="   "), "prompt"),
        (GenRequest(), "prompt"),
        (GenRequest(prompt="a", messages=[{"role": "user", "content": "b"}]), "prompt"),
        (GenRequest(messages=[]), "messages"),
        (GenRequest(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
        (GenRequest(messages=[{"role": "user", "content": 3}]), "messages[0]"),  # type: ignore[dict-item]
        (GenRequest(messages=[{"role": "user", "content": ""}]), "messages"),
        (GenRequest(messages=["hi"]), "messages[0]"),  # type: ignore[list-item]
        (GenRequest(prompt="a", max_tokens=0), "max_tokens"),
        (GenRequest(prompt="a", max_tokens=600), "max_tokens"),  # over the model's 512 positions
        (GenRequest(prompt="a", temperature=-1), "temperature"),
        (GenRequest(prompt="a", top_p=0), "top_p"),
        (GenRequest(prompt="a", stop=[""]), "stop"),
    ],
)
def test_bad_requests_are_invalid_request(model: Any, tok: Any, req: GenRequest, param: str) -> None:
    engine = BuiltinEngine(model, tok, version="t")
    with pytest.raises(InvalidRequest) as info:
        run(_served(engine, [req]))
    assert info.value.param == param
    assert engine.stats.batches == 0


def test_a_decode_failure_reaches_the_caller_and_the_engine_lives_on(
    model: Any, tok: Any, monkeypatch
) -> None:
    engine = BuiltinEngine(model, tok, version="t")
    good = GenRequest(prompt="Hello", max_tokens=3, temperature=0)

    async def main() -> GenResult:
        real = engine._decode
        monkeypatch.setattr(engine, "_decode", lambda group: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(EngineError, match="generation failed: RuntimeError: boom"):
            await engine.generate(good)
        monkeypatch.setattr(engine, "_decode", real)
        out = await engine.generate(good)
        await engine.aclose()
        return out

    assert run(main()).completion_tokens >= 1


# ---------------------------------------------------------------------------------------------------------------------
# build_engine


def test_build_engine_from_the_store(sqlite_workspace, model_dir: Path) -> None:
    from alignflow.store import Store

    store = Store.open(sqlite_workspace)
    try:
        aid = store.put_directory(model_dir, kind="checkpoint", name="support-policy")
        by_version = build_engine({"name": "a", "ref": "support-policy@v1", "max_batch": 4}, store)
        by_id = build_engine({"name": "a", "engine": "builtin", "ref": aid, "batch_window_ms": 5}, store)
        assert by_version.version == "support-policy@v1" and by_id.version == aid
        assert isinstance(by_version, BuiltinEngine) and by_version.max_batch == 4
        out = run(_served(by_id, [GenRequest(prompt="Hello", max_tokens=2, temperature=0)]))
        assert out[0].completion_tokens >= 1
        folder = build_engine({"name": "a", "ref": str(model_dir)}, None)
        assert folder.version == model_dir.name
        with pytest.raises(ConfigError, match="no artifact of that id or name"):
            build_engine({"name": "a", "ref": "nope@v9"}, store)
        with pytest.raises(ConfigError, match="unknown field.*max_bach"):
            build_engine({"name": "a", "ref": aid, "max_bach": 4}, store)
        with pytest.raises(ConfigError, match="engine must be"):
            build_engine({"name": "a", "engine": "vllm", "ref": aid}, store)
        with pytest.raises(ConfigError, match="needs url and upstream_model"):
            build_engine({"name": "b", "engine": "upstream", "url": "http://x/v1"}, store)
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------------------------------
# upstream


@contextmanager
def _serve(app: Any) -> Iterator[str]:
    """Run a FastAPI app on a free port in a thread; yields its ``/v1`` base URL."""
    with serve_app(app, lifespan="off") as base:
        yield f"{base}/v1"


def _echo_app() -> Any:
    """/v1/completions and /v1/chat/completions, streaming or not: the reply is "echo" and the prompt's words,
    cut at max_tokens words (finish_reason "length"); usage counts words; the bodies are kept in ``app.bodies``."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    app.state.bodies = []

    def reply(body: dict[str, Any], prompt: str) -> Any:
        app.state.bodies.append(body)
        words = ["echo", *prompt.split()]
        limit = int(body.get("max_tokens") or 16)
        out, reason = (words[:limit], "length") if len(words) > limit else (words, "stop")
        chat = "messages" in body
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(out), "total_tokens": 0}
        if not body.get("stream"):
            choice = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(out)},
                    "finish_reason": reason,
                }
                if chat
                else {"index": 0, "text": " ".join(out), "finish_reason": reason, "logprobs": None}
            )
            kind = "chat.completion" if chat else "text_completion"
            return {
                "id": "x-1",
                "object": kind,
                "created": 0,
                "model": body["model"],
                "choices": [choice],
                "usage": usage,
            }

        def events() -> Iterator[str]:
            kind = "chat.completion.chunk" if chat else "text_completion"
            for i, w in enumerate(out):
                piece = w if i == 0 else " " + w
                last = i == len(out) - 1
                choice = (
                    {"index": 0, "delta": {"content": piece}, "finish_reason": reason if last else None}
                    if chat
                    else {
                        "index": 0,
                        "text": piece,
                        "finish_reason": reason if last else None,
                        "logprobs": None,
                    }
                )
                ev = {"id": "x-1", "object": kind, "created": 0, "model": body["model"], "choices": [choice]}
                yield f"data: {json.dumps(ev)}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                ev = {
                    "id": "x-1",
                    "object": kind,
                    "created": 0,
                    "model": body["model"],
                    "choices": [],
                    "usage": usage,
                }
                yield f"data: {json.dumps(ev)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        return reply(body, body["prompt"])

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        return reply(body, body["messages"][-1]["content"])

    return app


def test_upstream_chat_against_the_fake_openai_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from alignflow.judges.testing import FakeOpenAI, serve

    monkeypatch.setenv("UPSTREAM_KEY", "sk-secret-123")
    fake = FakeOpenAI(
        policy=lambda msgs: f"you said {msgs[-1]['content']}", api_key="sk-secret-123", models=("m",)
    )
    with serve(fake):
        spec = {
            "name": "b",
            "engine": "upstream",
            "url": fake.base_url,
            "upstream_model": "m",
            "api_key": "${ENV:UPSTREAM_KEY}",
        }
        engine = build_engine(spec, None)
        assert "sk-secret" not in repr(engine) and engine.version == f"m@{fake.base_url}"
        req = GenRequest(messages=[{"role": "developer", "content": "x"}, {"role": "user", "content": "hi there"}],
                         max_tokens=7, temperature=0.3, top_p=0.9, seed=4, stop=["\n"])  # fmt: skip

        async def main() -> GenResult:
            try:
                return await engine.generate(req)
            finally:
                await engine.aclose()

        out = run(main())
    assert out == GenResult("you said hi there", 3, 4, "stop")  # the fake counts words
    body = fake.bodies[-1]
    assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"], body["seed"], body["stop"]) == (
        "m", 7, 0.3, 0.9, 4, ["\n"],
    )  # fmt: skip
    assert body["messages"][0] == {"role": "system", "content": "x"}


def _fail(fake_kw: dict[str, Any], engine_kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> EngineError:
    from alignflow.judges.testing import FakeOpenAI, serve

    monkeypatch.setenv("UPSTREAM_KEY", "sk-right-key")
    with serve(FakeOpenAI(policy=lambda m: "ok", **{"models": ("m",), **fake_kw})) as fake:
        engine = UpstreamEngine(fake.base_url, "m", api_key="${ENV:UPSTREAM_KEY}", max_retries=0, **engine_kw)

        async def main() -> None:
            try:
                await engine.generate(GenRequest(messages=[{"role": "user", "content": "hi"}]))
            finally:
                await engine.aclose()

        with pytest.raises(EngineError) as info:
            run(main())
    assert "sk-right-key" not in str(info.value)
    return info.value


def test_upstream_failures_become_engine_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    err = _fail({"fail_first": 5, "fail_status": 500}, {}, monkeypatch)
    assert type(err) is EngineError and "HTTP 500" in str(err)
    err = _fail({"fail_first": 5, "fail_status": 400}, {}, monkeypatch)
    assert isinstance(err, InvalidRequest)
    err = _fail({"delay": 1.5}, {"timeout": 0.3}, monkeypatch)
    assert type(err) is EngineError and "timed out" in str(err)
    err = _fail({"api_key": "sk-other"}, {}, monkeypatch)
    assert type(err) is EngineError and "HTTP 401" in str(err)
    err = _fail({"malformed": "empty_choices"}, {}, monkeypatch)
    assert "no choices" in str(err)
    err = _fail({"models": ("other",)}, {}, monkeypatch)
    assert isinstance(err, InvalidRequest) and "does not exist" in str(err)


def test_upstream_down_and_bad_specs() -> None:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there
    engine = UpstreamEngine(f"http://127.0.0.1:{port}/v1", "m", max_retries=0, timeout=2)

    async def main() -> None:
        try:
            await engine.generate(GenRequest(prompt="hi"))
        finally:
            await engine.aclose()

    with pytest.raises(EngineError, match="cannot connect"):
        run(main())
    with pytest.raises(InvalidRequest):  # validated before anything is sent
        run(engine.generate(GenRequest(prompt="hi", max_tokens=0)))
    with pytest.raises(ConfigError, match="environment variable NO_SUCH_KEY_S2 is not set"):
        UpstreamEngine("http://x/v1", "m", api_key="${ENV:NO_SUCH_KEY_S2}")
    with pytest.raises(ConfigError, match=r"\$\{ENV:NAME\} reference"):
        UpstreamEngine("http://x/v1", "m", api_key="sk-literal")


def test_upstream_completions_and_streaming() -> None:
    app = _echo_app()
    with _serve(app) as url:
        engine = UpstreamEngine(url, "m", max_retries=0, timeout=10)

        async def main() -> tuple[Any, ...]:
            try:
                done = await engine.generate(GenRequest(prompt="one two three", max_tokens=2))
                chat = [
                    c
                    async for c in engine.stream(GenRequest(messages=[{"role": "user", "content": "a b c"}]))
                ]
                text = [c async for c in engine.stream(GenRequest(prompt="a b c d", max_tokens=3))]
                return done, chat, text
            finally:
                await engine.aclose()

        done, chat, text = run(main())
    assert done == GenResult("echo one", 3, 2, "length")
    assert [c.delta for c in chat] == ["echo", " a", " b", " c", ""]
    assert chat[-1].result == GenResult("echo a b c", 3, 4, "stop")
    assert [c.delta for c in text][:-1] == ["echo", " a", " b"]
    assert text[-1].result == GenResult("echo a b", 4, 3, "length")
    streamed = [b for b in app.state.bodies if b.get("stream")]
    assert all(b["stream_options"] == {"include_usage": True} for b in streamed) and len(streamed) == 2

"""The gateway through the official `openai` client against a real uvicorn server: two tiny Llama policies behind
builtin engines, an experiment with weighted arms and segment rules, hashed keys with rate limits, OpenAI-style
errors, streaming, /metrics; plus the `deploy keys` and `deploy serve` commands and deploy.yaml validation."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from typer.testing import CliRunner

from alignflow.cli.main import app as cli_app
from alignflow.errors import ConfigError
from alignflow.judges.testing import free_socket
from alignflow.judges.testing import serve_app as run_uvicorn
from alignflow.models import make_tiny_model_dir
from alignflow.serving import keys
from alignflow.serving.app import make_app
from alignflow.serving.config import DeployConfig, load_deploy_config, validate_deploy
from alignflow.serving.experiments import pick_arm, unit_hash
from alignflow.serving.models import ServingApiKey, ServingResponse
from alignflow.store import Store, db
from alignflow.workspace import Workspace

ROOT = Path(__file__).resolve().parents[2]
MSG = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("policies")
    a = make_tiny_model_dir(root / "policy-a", vocab_size=300, hidden_size=32, num_layers=1, seed=0)
    b = make_tiny_model_dir(root / "policy-b", vocab_size=300, hidden_size=32, num_layers=1, seed=7)
    return a, b


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """The gateway under uvicorn (lifespan on: it builds and closes its engines); yields its base URL."""
    with run_uvicorn(app, lifespan="on") as base:
        yield base


def deploy_dict(a: Path, b: Path, **extra: Any) -> dict[str, Any]:
    return {
        "models": [
            {"name": "a", "ref": str(a), "version": "support-policy@1", "batch_window_ms": 5},
            {"name": "b", "ref": str(b), "batch_window_ms": 5},  # version label: the stored checkpoint's id
            # Nothing listens on port 9 (discard): a real upstream engine whose server is down.
            {"name": "down", "engine": "upstream", "url": "http://127.0.0.1:9/v1", "upstream_model": "m",
             "timeout": 2, "max_retries": 0},
        ],
        "experiments": [
            {
                "name": "support",
                "arms": [{"name": "control", "model": "a", "weight": 3}, {"name": "candidate", "model": "b"}],
                "segments": [
                    {"field": "tag.tier", "in": ["vip", "gold"], "model": "b"},
                    {"field": "metadata.plan", "equals": "free", "model": "a"},
                ],
            }
        ],
        "limits": {"max_request_bytes": 20_000, "max_tokens": 32, "default_max_tokens": 8},
        "logging": {"enabled": True},
        **extra,
    }  # fmt: skip


@dataclass
class Gateway:
    url: str
    key: str
    slow_key: str  # 3 requests per minute
    revoked_key: str
    store: Store
    cfg: DeployConfig

    def client(self, key: str | None = None, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.key, max_retries=0, **kw)


@pytest.fixture(scope="module")
def gw(policies: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    store = Store.open(Workspace.from_env(tmp_path_factory.mktemp("ws")))
    cfg = validate_deploy(deploy_dict(*policies))
    with db.session_factory(store.engine)() as s:
        _, key = keys.create_key(s, "tests", rate_per_minute=100_000)
        _, slow = keys.create_key(s, "slow", rate_per_minute=3)
        revoked_row, revoked = keys.create_key(s, "gone")
        keys.revoke_key(s, revoked_row.id)
    with serve_app(make_app(cfg, store)) as url:
        yield Gateway(url, key, slow, revoked, store, cfg)
    store.close()


def _version(gw: Gateway, model: str) -> str:
    return httpx.get(f"{gw.url}/healthz").json()["models"][model]


# ------------------------------------------------------------------------------------------------ completions


def test_chat_completion_names_version_and_arm_in_headers_and_body(gw: Gateway):
    user = next(u for u in (f"user-{i}" for i in range(100)) if pick_arm(gw.cfg.experiments[0],
                unit_hash("support", u)) == 1)  # fmt: skip
    raw = gw.client().chat.completions.with_raw_response.create(
        model="support", messages=MSG, user=user, max_tokens=6, temperature=0
    )
    chat = raw.parse()
    assert raw.headers["x-alignflow-arm"] == "candidate"
    assert raw.headers["x-alignflow-experiment"] == "support"
    version_b = _version(gw, "b")
    assert raw.headers["x-alignflow-model-version"] == version_b and len(version_b) == 64  # a checkpoint id
    assert chat.model_extra["alignflow"] == {
        "model": "b", "version": version_b, "arm": "candidate", "experiment": "support",
    }  # fmt: skip
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion" and chat.model == "b"
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert 1 <= chat.usage.completion_tokens <= 6 and chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    # Logging is on: the row carries the id the client got, the version, the arm and the token counts.
    with gw.store.session() as s:
        row = s.get(ServingResponse, chat.id)
        assert row is not None
        assert (row.model, row.version, row.arm, row.experiment, row.user) == ("b", version_b, "candidate",
                                                                               "support", user)  # fmt: skip
        assert row.response == chat.choices[0].message.content
        assert row.completion_tokens == chat.usage.completion_tokens and row.latency_ms > 0


def test_completion_of_a_model_named_directly(gw: Gateway):
    raw = gw.client().completions.with_raw_response.create(
        model="a", prompt="The weather today", max_tokens=5
    )
    done = raw.parse()
    assert raw.headers["x-alignflow-model-version"] == "support-policy@1"
    assert "x-alignflow-arm" not in raw.headers  # no experiment, no arm
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    assert done.model_extra["alignflow"] == {"model": "a", "version": "support-policy@1", "arm": None,
                                             "experiment": None}  # fmt: skip
    assert isinstance(done.choices[0].text, str) and done.usage.completion_tokens <= 5
    # Without max_tokens the gateway's default_max_tokens (8) applies.
    long = gw.client().completions.create(model="a", prompt="Once", temperature=0)
    assert long.usage.completion_tokens <= 8


def test_streaming_chat_and_completions_match_the_unstreamed_answer(gw: Gateway):
    client = gw.client()
    kw: dict[str, Any] = {"model": "a", "max_tokens": 10, "temperature": 0}
    whole = client.chat.completions.create(messages=MSG, **kw)
    raw = client.chat.completions.with_raw_response.create(
        messages=MSG, stream=True, stream_options={"include_usage": True}, **kw
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-alignflow-model-version"] == "support-policy@1"
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: the same tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )
    assert all(c.model_extra["alignflow"]["version"] == "support-policy@1" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")

    whole_c = client.completions.create(prompt="Numbers: 3, 14", **kw)
    pieces = list(client.completions.create(prompt="Numbers: 3, 14", stream=True, **kw))
    assert "".join(p.choices[0].text for p in pieces) == whole_c.choices[0].text
    assert pieces[-1].choices[0].finish_reason == whole_c.choices[0].finish_reason
    # The raw wire format: SSE data lines ending with [DONE].
    with httpx.stream("POST", f"{gw.url}/v1/completions", json={"prompt": "Hi", "stream": True, **kw},
                      headers={"Authorization": f"Bearer {gw.key}"}) as r:  # fmt: skip
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


# ------------------------------------------------------------------------------------------------ experiments


def test_sticky_arms_per_user_and_a_split_by_weight(gw: Gateway):
    exp = gw.cfg.experiments[0]
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)

    async def arm_of(user: str, via_header: bool = False) -> str:
        kw: dict[str, Any] = {"extra_headers": {"X-User-Id": user}} if via_header else {"user": user}
        raw = await client.chat.completions.with_raw_response.create(
            model="support", messages=MSG, max_tokens=1, **kw
        )
        body = raw.parse()
        assert body.model_extra["alignflow"]["arm"] == raw.headers["x-alignflow-arm"]
        return raw.headers["x-alignflow-arm"]

    async def anonymous() -> str:
        raw = await client.chat.completions.with_raw_response.create(
            model="support", messages=MSG, max_tokens=1
        )
        return raw.headers["x-alignflow-arm"]

    async def run() -> tuple[list[str], list[str], dict[str, str], list[str]]:
        same = await asyncio.gather(*(arm_of("alice") for _ in range(20)))
        same_header = await asyncio.gather(*(arm_of("alice", via_header=True) for _ in range(5)))
        users = [f"u{i}" for i in range(160)]
        arms = await asyncio.gather(*(arm_of(u) for u in users))
        no_user = await asyncio.gather(*(anonymous() for _ in range(40)))
        await client.close()
        return same, same_header, dict(zip(users, arms, strict=True)), no_user

    same, same_header, by_user, no_user = asyncio.run(run())
    # Without a user id each request draws an arm: 40 draws at 3:1 all alike has probability about 1e-5.
    assert set(no_user) == {"control", "candidate"}
    assert len(set(same)) == 1 and set(same_header) == set(same)  # alice keeps her arm, by field or header
    # Each user's arm is the documented hash rule's, and the 3:1 weights split them about 120:40.
    assert all(arm == exp.arms[pick_arm(exp, unit_hash("support", u))].name for u, arm in by_user.items())
    share = Counter(by_user.values())["control"] / len(by_user)
    assert 0.62 <= share <= 0.87, share  # 3/4 +- 3.5 standard errors of 160 users


def test_segment_rules_pin_before_the_arms(gw: Gateway):
    exp = gw.cfg.experiments[0]
    control_user = next(
        u for u in (f"c{i}" for i in range(100)) if pick_arm(exp, unit_hash("support", u)) == 0
    )
    cand_user = next(u for u in (f"d{i}" for i in range(100)) if pick_arm(exp, unit_hash("support", u)) == 1)
    client = gw.client()

    def routed(user: str, **kw: Any) -> tuple[str, str]:
        raw = client.chat.completions.with_raw_response.create(
            model="support", messages=MSG, max_tokens=1, user=user, **kw
        )
        return raw.headers["x-alignflow-arm"], raw.parse().model_extra["alignflow"]["model"]

    assert routed(control_user) == ("control", "a")
    assert routed(control_user, extra_headers={"X-Alignflow-Tag-Tier": "vip"}) == ("candidate", "b")
    assert routed(control_user, extra_headers={"X-Alignflow-Tag-Tier": "basic"}) == ("control", "a")
    assert routed(cand_user) == ("candidate", "b")
    assert routed(cand_user, metadata={"plan": "free"}) == ("control", "a")
    # The first matching rule wins: the tag rule comes before the metadata rule.
    pinned = routed(cand_user, metadata={"plan": "free"}, extra_headers={"X-Alignflow-Tag-Tier": "gold"})
    assert pinned == ("candidate", "b")


# ---------------------------------------------------------------------------------------------- keys, limits


def test_rate_limit_gives_429_with_openai_body_and_retry_after(gw: Gateway):
    client = gw.client(gw.slow_key)
    for _ in range(3):
        client.models.list()
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="a", messages=MSG, max_tokens=1)
    assert err.value.status_code == 429
    assert (
        err.value.body["type"] == "rate_limit_exceeded"
        and "3 requests per minute" in err.value.body["message"]
    )
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 20  # one token every 20 s
    gw.client().models.list()  # another key is not limited


def test_missing_invalid_and_revoked_keys_get_401(gw: Gateway):
    for key in ("not-a-key", gw.revoked_key):
        with pytest.raises(openai.AuthenticationError) as err:
            gw.client(key).chat.completions.create(model="a", messages=MSG)
        assert (
            err.value.body["code"] == "invalid_api_key" and err.value.body["type"] == "invalid_request_error"
        )
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "a", "messages": MSG})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


def test_bad_requests_get_4xx_with_openai_style_bodies(gw: Gateway):
    client = gw.client()
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-9", messages=MSG)
    assert nf.value.body["param"] == "model" and nf.value.body["code"] == "model_not_found"

    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model="a", messages=MSG, max_tokens=33)
    assert too_many.value.body["param"] == "max_tokens" and "limit of 32" in too_many.value.body["message"]
    with pytest.raises(
        openai.BadRequestError
    ) as too_long:  # the model's 512 positions, checked by the engine
        client.completions.create(model="a", prompt="word " * 600, max_tokens=4)
    assert (
        too_long.value.body["param"] == "max_tokens"
        and "exceeds the model's limit" in too_long.value.body["message"]
    )

    cases = [
        ({"temperature": 5}, "temperature"),
        ({"n": 2}, "n"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"logit_bias": {"1": 3}}, "logit_bias"),
    ]
    for patch, param in cases:
        body = {"model": "a", "messages": MSG, **patch}
        with pytest.raises(openai.UnprocessableEntityError) as bad:
            client.chat.completions.create(**body) if "logit_bias" not in patch else \
                client.chat.completions.create(model="a", messages=MSG, extra_body=patch)  # fmt: skip
        assert bad.value.body["param"] == param, (patch, bad.value.body)
        assert bad.value.body["type"] == "invalid_request_error" and bad.value.body["message"].startswith(
            param
        )

    with pytest.raises(openai.APIStatusError) as big:
        client.completions.create(model="a", prompt="x" * 30_000, max_tokens=1)
    assert big.value.status_code == 413 and "larger than 20000 bytes" in big.value.body["message"]

    with pytest.raises(openai.InternalServerError) as down:  # the upstream server is not there: 502
        client.chat.completions.create(model="down", messages=MSG)
    assert down.value.status_code == 502 and down.value.body["code"] == "engine_error"
    with pytest.raises(openai.InternalServerError) as down_stream:  # a stream fails before its 200 is sent
        client.chat.completions.create(model="down", messages=MSG, stream=True)
    assert down_stream.value.status_code == 502

    auth = {"Authorization": f"Bearer {gw.key}"}
    r = httpx.post(
        f"{gw.url}/v1/completions", content=b"{not json", headers={**auth, "content-type": "application/json"}
    )
    assert r.status_code == 422 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{gw.url}/v1/embeddings", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_models_and_healthz(gw: Gateway):
    ids = {m.id: m.model_extra["alignflow"] for m in gw.client().models.list()}
    assert set(ids) == {"a", "b", "down", "support"}
    assert ids["a"] == {"kind": "model", "version": "support-policy@1"}
    assert [arm["name"] for arm in ids["support"]["arms"]] == ["control", "candidate"]
    assert gw.client().models.retrieve("support").model_extra["alignflow"]["kind"] == "experiment"
    with pytest.raises(openai.NotFoundError):
        gw.client().models.retrieve("nope")
    health = httpx.get(f"{gw.url}/healthz").json()
    assert health["status"] == "ok" and health["models"]["a"] == "support-policy@1"


def test_metrics_count_requests_errors_tokens_and_latency(gw: Gateway):
    client = gw.client()
    client.chat.completions.create(model="support", messages=MSG, max_tokens=2, user="metrics-user")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)
    text = httpx.get(f"{gw.url}/metrics").text
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def total(name: str, **labels: str) -> float:
        return sum(
            s.value
            for s in samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    arm = (
        gw.client()
        .chat.completions.with_raw_response.create(
            model="support", messages=MSG, max_tokens=1, user="metrics-user"
        )
        .headers["x-alignflow-arm"]
    )
    ok = total("alignflow_gateway_requests_total", endpoint="/v1/chat/completions", arm=arm, status="200")
    assert ok >= 1
    assert total("alignflow_gateway_errors_total", status="404", type="invalid_request_error") >= 1
    assert total("alignflow_gateway_tokens_total", arm=arm, kind="completion") >= 1
    assert total("alignflow_gateway_tokens_total", model="a", version="support-policy@1", kind="prompt") >= 1
    assert total("alignflow_gateway_latency_seconds_count", endpoint="/v1/chat/completions", arm=arm) >= 1


# ------------------------------------------------------------------------------------------- CLI and config


def test_keys_commands_store_only_the_hash(tmp_path: Path):
    runner = CliRunner()
    home = str(tmp_path / "ws")
    added = runner.invoke(
        cli_app, ["deploy", "keys", "add", "team-a", "--rate", "30", "--json", "--home", home]
    )
    assert added.exit_code == 0, added.output
    info = json.loads(added.stdout)
    assert info["rate_per_minute"] == 30 and info["key"].startswith(keys.KEY_PREFIX)
    plain = runner.invoke(cli_app, ["deploy", "keys", "add", "team-b", "--home", home])
    assert plain.exit_code == 0 and "shown once" in plain.stdout
    raw_b = plain.stdout.strip().splitlines()[-1]
    store = Store.open(Workspace.from_env(home))
    with store.session() as s:
        rows = list(s.scalars(select(ServingApiKey).order_by(ServingApiKey.id)))
        assert [r.key_hash for r in rows] == [
            hashlib.sha256(k.encode()).hexdigest() for k in (info["key"], raw_b)
        ]
        assert keys.verify_key(s, raw_b) is not None
    listed = runner.invoke(cli_app, ["deploy", "keys", "list", "--json", "--home", home])
    assert [(k["name"], k["revoked_at"]) for k in json.loads(listed.stdout)] == [
        ("team-a", None),
        ("team-b", None),
    ]
    assert info["key"] not in listed.stdout and raw_b not in listed.stdout
    revoked = runner.invoke(cli_app, ["deploy", "keys", "revoke", str(info["id"]), "--home", home])
    assert revoked.exit_code == 0 and "revoked key" in revoked.stdout
    with store.session() as s:
        assert keys.verify_key(s, info["key"]) is None and keys.verify_key(s, raw_b) is not None
    missing = runner.invoke(cli_app, ["deploy", "keys", "revoke", "99", "--home", home])
    assert missing.exit_code != 0 and "no API key with id 99" in str(missing.exception)
    store.close()


def test_rate_limiter_refills_at_the_keys_rate():
    now = [0.0]
    limiter = keys.RateLimiter(default_per_minute=60, clock=lambda: now[0])
    assert [limiter.acquire(1, 2) for _ in range(3)] == [0.0, 0.0, pytest.approx(30.0)]
    now[0] = 29.0
    assert limiter.acquire(1, 2) == pytest.approx(1.0)
    now[0] = 30.0
    assert limiter.acquire(1, 2) == 0.0
    assert all(limiter.acquire(2, None) == 0.0 for _ in range(60)) and limiter.acquire(2, None) > 0


def test_deploy_yaml_errors_name_file_line_and_field(tmp_path: Path):
    path = tmp_path / "deploy.yaml"
    path.write_text(
        "models:\n  - {name: a, ref: /x}\n  - {name: a, ref: /y, colour: red}\n"
        "experiments:\n  - name: e\n    arms:\n      - {name: c, model: zz}\n"
        "limits:\n  max_tokens: 0\n"
    )
    with pytest.raises(ConfigError) as err:
        load_deploy_config(path)
    msg = str(err.value)
    assert f"{path}:3: models.1.colour: unknown key" in msg
    assert f"{path}:9: limits.max_tokens: Input should be greater than or equal to 1" in msg
    path.write_text(
        "models:\n  - {name: a, ref: /x}\n  - {name: a, ref: /y}\n"
        "experiments:\n  - name: e\n    arms:\n      - {name: c, model: zz}\n    segments:\n"
        "      - {field: tag.t, equals: v, model: a}\n  - name: a\n    arms: [{name: c, model: a}]\n"
    )
    with pytest.raises(ConfigError) as err:
        load_deploy_config(path)
    msg = str(err.value)
    assert f"{path}:3: models.1.name: duplicate model name 'a'" in msg
    assert f"{path}:7: experiments.0.arms.0.model: unknown model 'zz'" in msg
    assert "experiments.1.name: 'a' is also a model name" in msg
    with pytest.raises(ConfigError, match="ANSWER_KEY is not set"):
        validate_deploy({"models": [{"name": "u", "engine": "upstream", "url": "http://h/v1",
                                     "upstream_model": "m", "api_key": "${ENV:ANSWER_KEY}"}]})  # fmt: skip
    with pytest.raises(ConfigError, match="exactly one of `equals` or `in`"):
        validate_deploy({"models": [{"name": "m", "ref": "/x"}], "experiments": [{"name": "e", "arms": [
            {"name": "c", "model": "m"}], "segments": [{"field": "user", "model": "m"}]}]})  # fmt: skip


def test_example_deploy_yaml_validates():
    cfg = load_deploy_config(ROOT / "examples" / "deploy.yaml")
    assert cfg.experiments and not cfg.logging.enabled and cfg.limits.max_tokens >= 1


def test_deploy_serve_command(policies: tuple[Path, Path], tmp_path: Path):
    """The console script serves a config until stopped: healthz, one chat completion through the client."""
    home = tmp_path / "ws"
    config = tmp_path / "deploy.yaml"
    spec = deploy_dict(*policies)
    spec["models"] = spec["models"][:1]
    spec["experiments"] = []
    config.write_text(yaml.safe_dump(spec))
    runner = CliRunner()
    out = runner.invoke(cli_app, ["deploy", "keys", "add", "cli", "--json", "--home", str(home)])
    key = json.loads(out.stdout)["key"]
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignflow.cli.main", "deploy", "serve", "--config", str(config), "--port",
         str(port), "--home", str(home)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "deploy serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        chat = client.chat.completions.create(model="a", messages=MSG, max_tokens=3)
        assert chat.model_extra["alignflow"]["version"] == "support-policy@1"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert "serving a=support-policy@1" in (proc.stdout.read() if proc.stdout else "")

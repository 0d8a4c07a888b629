"""schemathesis against the gateway's own OpenAPI schema, in-process, with a real builtin engine behind it.

Every operation gets schema-valid (positive) and schema-violating (negative) cases, with and without an API key.
Random `model` strings only reach the 404, so half of the cases with a body are pointed at a real model or the
experiment to get through to the engine. Two checks: no status >= 500, and only statuses the schema declares.
Bounded: `MAX_EXAMPLES` per operation, mode and credential, and the gateway caps max_tokens at 8.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import status_code_conformance

from alignflow.models import make_tiny_model_dir
from alignflow.serving import keys
from alignflow.serving.app import make_app
from alignflow.serving.config import validate_deploy
from alignflow.store import Store, db
from alignflow.workspace import Workspace

MAX_EXAMPLES = 25
TARGETS = (None, "a", "support")  # None: leave the fuzzer's model string alone


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _fuzz(
    operation, who: str, headers: dict, cases: Counter, statuses: Counter, ok: Counter, failures: list
) -> None:
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        case=st.one_of([operation.as_strategy(generation_mode=m) for m in GenerationMode]),
        target=st.sampled_from(TARGETS),
    )
    def run(case, target) -> None:
        if target is not None and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = target
        if "model" in (case.path_parameters or {}) and target is not None:
            case.path_parameters["model"] = target
        cases[who] += 1
        response = case.call(headers=headers)
        statuses[response.status_code] += 1
        ok[operation.label] += response.status_code in (200, 201)
        try:
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
        except (Failure, FailureGroup) as exc:
            kinds = sorted(set(re.findall(r"- (ST\d+ [^\n]+)", str(exc)))) or [str(exc)[:200]]
            failures.append(f"{who} {operation.label}: {response.status_code} {kinds} {response.text[:200]}")

    run()


def test_fuzz_every_operation(tmp_path: Path):
    a = make_tiny_model_dir(tmp_path / "policy-a", vocab_size=300, hidden_size=32, num_layers=1, seed=0)
    b = make_tiny_model_dir(tmp_path / "policy-b", vocab_size=300, hidden_size=32, num_layers=1, seed=7)
    store = Store.open(Workspace.from_env(tmp_path / "ws"))
    cfg = validate_deploy(
        {
            "models": [{"name": "a", "ref": str(a), "batch_window_ms": 0}, {"name": "b", "ref": str(b)}],
            "experiments": [
                {
                    "name": "support",
                    "arms": [{"name": "control", "model": "a"}, {"name": "candidate", "model": "b"}],
                    "segments": [{"field": "metadata.plan", "in": ["free"], "model": "b"}],
                }
            ],
            "limits": {"max_tokens": 8, "default_max_tokens": 4, "max_request_bytes": 50_000},
            "logging": {"enabled": True},  # so the fuzzer's texts also go through the log writer
        }
    )
    with db.session_factory(store.engine)() as s:
        _, key = keys.create_key(s, "fuzz", rate_per_minute=1_000_000)
    schema = schemathesis.openapi.from_asgi("/openapi.json", make_app(cfg, store))
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "GET /v1/models",
        "POST /v1/feedback",
    } <= labels
    cases: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    ok: Counter[str] = Counter()  # successful cases per operation
    failures: list[str] = []
    for who, headers in (("anonymous", {}), ("key", {"Authorization": f"Bearer {key}"})):
        for operation in operations:
            _fuzz(operation, who, headers, cases, statuses, ok, failures)
    print(
        f"\nschemathesis on the gateway: cases {dict(cases)}, statuses {dict(sorted(statuses.items()))}, ok {dict(ok)}"
    )
    store.close()
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures[:25])
    assert statuses[401] > 0 and sum(statuses.values()) == sum(cases.values())
    # The fuzzer got through to the engines, not only to the refusals.
    assert ok["POST /v1/chat/completions"] > 0 and ok["POST /v1/completions"] > 0, dict(ok)

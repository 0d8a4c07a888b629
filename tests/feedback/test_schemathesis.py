"""schemathesis against the served OpenAPI schema, with each role's API token, on SQLite and PostgreSQL.

Every operation gets schema-valid (positive) and schema-violating (negative) cases, half of them aimed at the
real project, item and user so they get past the 404s. Two checks: no status >= 500, and only responses the
schema declares. Input limits live in the schema (`feedback/fields.py`), so what the fuzzer may send is what
both databases accept. Bounded: `MAX_EXAMPLES` per operation, role and mode.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
import schemathesis
from fb_helpers import PASSWORD, answer, pair_items
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import status_code_conformance

from alignflow.feedback import auth, services
from alignflow.feedback.app import create_app

pytestmark = pytest.mark.slow
MAX_EXAMPLES = 4
# The admin goes last: its cases may disable the annotator or revoke tokens the others still use.
ROLES = {
    "anonymous": None,
    "annotator": ("ann", "annotator", "pod1"),
    "reviewer": ("rev", "reviewer", "pod1"),
    "lead": ("lead", "lead", "pod1"),
    "lead_nopod": ("loner", "lead", None),
    "admin": ("admin", "admin", None),
}
KNOWN = {"name": "p", "item_id": "i0", "username": "ann", "item_pk": 1, "response_id": 1, "action_id": 1}


def _world(s) -> dict[str, str]:
    tokens = {}
    for role, spec in ROLES.items():
        if spec is not None:
            username, platform_role, pod = spec
            services.add_user(s, username, PASSWORD, platform_role, pod=pod)
            tokens[role] = services.create_token(s, None, username, "fuzz", list(auth.SCOPES))[1]
    services.create_project(s, "p", "# Guide", overlap=3, gold_rate=0.2, qa_rate=0.5)
    services.import_items(s, "p", pair_items(6, gold=2))
    task = services.next_task(s, "ann", "p")
    services.submit(s, "ann", task["assignment_id"], answer(task), "fuzz-world-1")
    services.apply_qc(s, None, "ann", "coach", "fuzz")
    return tokens


def _strategy(operation) -> st.SearchStrategy:
    known = {k: v for k, v in KNOWN.items() if k in re.findall(r"{(\w+)}", operation.path)}
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    options = [operation.as_strategy(generation_mode=m) for m in modes]
    if known:
        options += [operation.as_strategy(generation_mode=m, path_parameters=known) for m in modes]
    return st.one_of(options)


def _fuzz(operation, role: str, headers: dict, cases: Counter, statuses: Counter, failures: list) -> None:
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=_strategy(operation))
    def run(case) -> None:
        cases[role] += 1
        response = case.call(headers=headers)
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
        except (Failure, FailureGroup) as exc:
            kinds = sorted(set(re.findall(r"- (ST\d+ [^\n]+)", str(exc)))) or [str(exc)[:200]]
            failures.append(f"{role} {operation.label}: {response.status_code} {kinds} {response.text[:150]}")

    run()


def test_fuzz_every_operation_as_every_role(workspace, s):
    tokens = _world(s)
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", create_app(workspace))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 31  # every /api/v1 route (the role matrix lists them)
    cases: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    for role in ROLES:
        headers = {"Authorization": f"Bearer {tokens[role]}"} if role in tokens else {}
        for operation in operations:
            _fuzz(operation, role, headers, cases, statuses, failures)
    db = workspace.db_url.split(":")[0]
    print(f"\nschemathesis on {db}: cases per role {dict(cases)}, statuses {dict(sorted(statuses.items()))}")
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures[:25])
    assert statuses[200] + statuses[201] > 0 and sum(statuses.values()) == sum(cases.values())

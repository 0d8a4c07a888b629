"""Production logs: the gateway's responses and the feedback users give on them, and their retention purge.

Logging is opt-in (`logging.enabled` in deploy.yaml): the gateway calls :func:`record_response` after each
completion, with the OpenAI `id` the client receives as the row's key, so `POST /v1/feedback` names a
response by the id the client already has. :func:`purge_expired` deletes responses older than the retention
period together with their feedback (the foreign key cascades, and the purge deletes feedback explicitly
too, for SQLite connections opened without `PRAGMA foreign_keys`), and journals how many rows it removed.

Every function takes a session and commits its own transaction; errors are the annotation platform's
service errors (`NotFound` 404, `Invalid` 422), which carry the HTTP status the router maps them to.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from alignflow.feedback.fields import text_problem
from alignflow.feedback.journal import record
from alignflow.feedback.services.errors import Conflict, Invalid, NotFound
from alignflow.serving.models import FEEDBACK_KINDS, ServingFeedback, ServingResponse
from alignflow.store.models import utcnow

MAX_FEEDBACK_TEXT = 20_000  # a correction is a reply, so the same order as a candidate's text
RESPONSE_ID_CHARS = 64
_PAYLOAD_FIELDS = {"type", "rating", "correction", "text"}


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def sanitize_text(text: str) -> str:
    """`text` with NUL characters and lone surrogates replaced by U+FFFD.

    A sampled model can emit a NUL (a byte-level token 0); PostgreSQL refuses NUL in text columns and neither
    database can encode a lone surrogate as UTF-8, so without this such a reply would not be logged at all
    on PostgreSQL, and would be logged on SQLite: the same gateway would keep different logs per database.
    """
    if "\x00" not in text:
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
    return "".join("\ufffd" if c == "\x00" or "\ud800" <= c <= "\udfff" else c for c in text)


def record_response(
    s: Session,
    *,
    request_id: str,
    model: str,
    version: str,
    arm: str | None,
    experiment: str | None,
    user: str | None,
    prompt: str,
    messages: list[dict] | None,
    response: str,
    prompt_tokens: int,
    completion_tokens: int,
    latency_ms: float,
    key_id: int | None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log one completion under `request_id` (the OpenAI `id` the client gets); returns that id. Commits.

    Texts are stored through :func:`sanitize_text` (a NUL or lone surrogate becomes U+FFFD)."""
    if not request_id or len(request_id) > RESPONSE_ID_CHARS:
        raise Invalid(f"response id: expected 1..{RESPONSE_ID_CHARS} characters, got {request_id!r}")
    if s.get(ServingResponse, request_id) is not None:
        raise Conflict(f"response {request_id!r} is already logged")
    prompt, response = sanitize_text(prompt), sanitize_text(response)
    if messages is not None:
        messages = [
            {k: sanitize_text(v) if isinstance(v, str) else v for k, v in m.items()} for m in messages
        ]
    s.add(
        ServingResponse(
            id=request_id,
            model=model,
            version=version,
            arm=arm,
            experiment=experiment,
            user=user,
            prompt_sha256=prompt_hash(prompt),
            prompt=prompt,
            messages=messages,
            response=response,
            prompt_tokens=int(prompt_tokens),
            completion_tokens=int(completion_tokens),
            latency_ms=float(latency_ms),
            key_id=key_id,
            tags=dict(tags or {}),
        )
    )
    s.commit()
    return request_id


def validate_feedback(payload: dict[str, Any]) -> dict[str, Any]:
    """Check a feedback body (`type`, `rating`, `correction`, `text`); returns the normalised fields.

    Rules: `type` is one of FEEDBACK_KINDS; `rating` (an integer 1..5) is required for and only allowed with
    type "rating"; `correction` (non-empty text) is required for and only allowed with type "correction";
    `text` is free text on any type and required for type "text".
    """
    if not isinstance(payload, dict):
        raise Invalid(f"feedback: expected a JSON object, got {type(payload).__name__}")
    extra = sorted(set(payload) - _PAYLOAD_FIELDS - {"response_id"})
    if extra:
        raise Invalid(f"feedback: unknown field(s) {extra}; allowed {sorted(_PAYLOAD_FIELDS)}", extra[0])
    kind = payload.get("type")
    if kind not in FEEDBACK_KINDS:
        raise Invalid(f"feedback field 'type': expected one of {list(FEEDBACK_KINDS)}, got {kind!r}", "type")
    rating = payload.get("rating")
    if kind == "rating":
        if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
            raise Invalid(f"feedback field 'rating': expected an integer 1..5, got {rating!r}", "rating")
    elif rating is not None:
        raise Invalid(f"feedback field 'rating': only allowed with type 'rating', not {kind!r}", "rating")
    out: dict[str, Any] = {"kind": kind, "rating": rating}
    for field, required in (("correction", kind == "correction"), ("text", kind == "text")):
        value = payload.get(field)
        if value is None:
            if required:
                raise Invalid(f"feedback field '{field}': required with type {kind!r}", field)
            out[field] = None
            continue
        if field == "correction" and kind != "correction":
            raise Invalid(
                f"feedback field 'correction': only allowed with type 'correction', not {kind!r}", field
            )
        if not isinstance(value, str) or not value.strip():
            raise Invalid(f"feedback field '{field}': expected non-empty text", field)
        if len(value) > MAX_FEEDBACK_TEXT:
            raise Invalid(f"feedback field '{field}': longer than {MAX_FEEDBACK_TEXT} characters", field)
        problem = text_problem(value)
        if problem:
            raise Invalid(f"feedback field '{field}' {problem}", field)
        out[field] = value
    return out


def record_feedback(s: Session, response_id: str, payload: dict[str, Any], key_id: int | None) -> int:
    """Store one feedback event on a logged response; returns its id. Commits.

    Raises `NotFound` (404) for a response id that was never logged (or was purged) and `Invalid` (422) for
    a body that breaks :func:`validate_feedback`'s rules.
    """
    fields = validate_feedback(payload)
    if not isinstance(response_id, str) or not response_id or len(response_id) > RESPONSE_ID_CHARS:
        raise NotFound(f"no logged response {response_id!r}", "response_id")
    if s.get(ServingResponse, response_id) is None:
        raise NotFound(
            f"no logged response {response_id!r} (is logging enabled, or was it purged after retention?)",
            "response_id",
        )
    row = ServingFeedback(response_id=response_id, key_id=key_id, **fields)
    s.add(row)
    s.commit()
    return row.id


def get_response(s: Session, response_id: str) -> ServingResponse:
    row = s.get(ServingResponse, response_id)
    if row is None:
        raise NotFound(f"no logged response {response_id!r}", "response_id")
    return row


def feedback_for(s: Session, response_id: str) -> list[ServingFeedback]:
    return list(
        s.scalars(
            select(ServingFeedback)
            .where(ServingFeedback.response_id == response_id)
            .order_by(ServingFeedback.created_at, ServingFeedback.id)
        )
    )


def responses(
    s: Session, *, since: datetime | None = None, ids: Sequence[str] | None = None, limit: int | None = None
) -> list[ServingResponse]:
    """Logged responses, oldest first; `since` and `ids` filter, `limit` caps."""
    q = select(ServingResponse).order_by(ServingResponse.created_at, ServingResponse.id)
    if since is not None:
        q = q.where(ServingResponse.created_at >= since)
    if ids is not None:
        q = q.where(ServingResponse.id.in_(list(ids)))
    if limit is not None:
        q = q.limit(limit)
    return list(s.scalars(q))


def purge_expired(s: Session, retention_days: float, now: datetime | None = None) -> int:
    """Delete responses logged more than `retention_days` ago, with their feedback; returns how many
    responses went. Journals the counts (action "serving.purge"). Commits."""
    if isinstance(retention_days, bool) or not math.isfinite(retention_days) or retention_days < 0:
        raise Invalid(f"retention_days: expected a number >= 0, got {retention_days!r}", "retention_days")
    now = now or utcnow()
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    cutoff = now - timedelta(days=retention_days)
    old = select(ServingResponse.id).where(ServingResponse.created_at < cutoff)
    try:
        n_feedback = int(
            s.scalar(
                select(func.count()).select_from(ServingFeedback).where(ServingFeedback.response_id.in_(old))
            )
            or 0
        )
        s.execute(delete(ServingFeedback).where(ServingFeedback.response_id.in_(old)))
        n = s.execute(delete(ServingResponse).where(ServingResponse.created_at < cutoff)).rowcount or 0
        record(
            s,
            None,
            "serving.purge",
            "serving_responses",
            "*",
            {
                "responses": n,
                "feedback": n_feedback,
                "retention_days": retention_days,
                "cutoff": cutoff.isoformat(),
            },
        )
        s.commit()
    except Exception:
        s.rollback()
        raise
    return n

"""Production feedback: `POST /v1/feedback`, and turning negative feedback into annotation items.

`router` is mounted by the gateway (`serving/app.py`); it authenticates with the gateway's API keys and writes
through :func:`alignflow.serving.logs.record_feedback`.

:func:`feedback_to_annotation` closes the loop from production back to preference data:

* a negative event (thumbs_down, a rating at or below `low_rating`, and by default regenerate and abandon) on
  a logged response becomes a pairwise item: the disliked response against the other arm's (or other model
  version's) answer to the same prompt when one is logged, else a fresh sample from `sample_fn(prompt)`;
* a correction becomes an item (correction vs the original, so a person confirms the user's fix), an SFT row
  (prompt, correction) and a pair (correction preferred to the original), stored as `sft` and `pairs` datasets.

Items go to the top of the project's queue (priorities above every existing item, oldest feedback first).
Lineage: each batch is one `production_feedback` JSON artifact holding the responses and feedback it used (the
response ids are also in its meta, so `alignflow lineage` shows them), with edges to the policies that served
them when their versions are store artifacts. The items carry that artifact's id as their `source`, so
`annotate export` links its preferences and pairs to it ("items"), and the SFT and pairs datasets link to it
("production_feedback"); a checkpoint trained on those pairs links to them in turn.

A reply the platform cannot show (longer than `MAX_CANDIDATE_CHARS`; NULs were replaced when it was logged) gives
no item: its feedback is marked used (`unshowable`), and a correction of it still gives its SFT row and pair.

Idempotent: used feedback is marked (`processed_at`, `item_ids`, `artifact_id`) and never used again, and an
item that already exists (a crash between the import and the marking) is linked rather than imported twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from alignflow.errors import StoreError
from alignflow.feedback import services
from alignflow.feedback.fields import MAX_CANDIDATE_CHARS, text_problem
from alignflow.feedback.journal import record
from alignflow.feedback.models import Item
from alignflow.feedback.services.errors import ServiceError
from alignflow.serving import logs
from alignflow.serving.deps import ApiError, KeyDep, SessionDep
from alignflow.serving.models import ServingFeedback, ServingResponse
from alignflow.store import Store
from alignflow.store.models import utcnow

router = APIRouter(tags=["feedback"])

NEGATIVE_KINDS = ("thumbs_down", "rating", "regenerate", "abandon")  # "rating" counts when <= low_rating
LOW_RATING = 2
INT32_MAX = 2**31 - 1


class FeedbackIn(BaseModel):
    """`POST /v1/feedback` body: the response's OpenAI `id` and what the user did."""

    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(min_length=1, max_length=logs.RESPONSE_ID_CHARS, pattern=r"^[^\x00]*$")
    type: Literal["thumbs_up", "thumbs_down", "rating", "correction", "regenerate", "abandon", "text"]
    rating: int | None = Field(default=None, ge=1, le=5, description="1..5; required with type 'rating'")
    correction: str | None = Field(
        default=None, max_length=logs.MAX_FEEDBACK_TEXT, description="the reply the user wanted"
    )
    text: str | None = Field(default=None, max_length=logs.MAX_FEEDBACK_TEXT, description="free text")


class FeedbackOut(BaseModel):
    id: int
    object: Literal["feedback"] = "feedback"
    response_id: str
    type: str


@router.post("/v1/feedback", status_code=201, response_model=FeedbackOut)
def post_feedback(body: FeedbackIn, s: SessionDep, key: KeyDep) -> FeedbackOut:
    """Record feedback on a logged response (404 when the id was never logged or has been purged)."""
    try:
        fid = logs.record_feedback(s, body.response_id, body.model_dump(exclude_none=True), key.id)
    except ServiceError as exc:
        code = "response_not_found" if exc.status == 404 else "invalid_feedback"
        raise ApiError(exc.status, str(exc), param=exc.field, code=code) from None
    return FeedbackOut(id=fid, response_id=body.response_id, type=body.type)


# ---------------------------------------------------------------------------------------------- to annotation


@dataclass
class FeedbackToAnnotation:
    """What one `feedback_to_annotation` call did."""

    artifact: str | None = None  # the batch's production_feedback artifact
    items: list[str] = field(default_factory=list)  # external ids of the items added
    sft: str | None = None  # the corrections' SFT dataset
    pairs: str | None = None  # the corrections' pairs dataset
    processed: list[int] = field(default_factory=list)  # feedback ids marked as used
    linked: list[int] = field(default_factory=list)  # of those, ids whose item already existed
    no_alternative: list[int] = field(default_factory=list)  # negative feedback left for a run with sample_fn
    unshowable: list[int] = field(default_factory=list)  # used, but no item: a reply the platform cannot show
    priority: int | None = None  # the highest queue priority given

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _is_negative(fb: ServingFeedback, kinds: tuple[str, ...], low_rating: int) -> bool:
    if fb.kind not in kinds:
        return False
    return fb.kind != "rating" or (fb.rating is not None and fb.rating <= low_rating)


def _unshowable(text: str) -> str | None:
    """Why the annotation platform cannot show `text` (a NUL or lone surrogate, which a sampled model can
    emit, or more than MAX_CANDIDATE_CHARS), else None."""
    if len(text) > MAX_CANDIDATE_CHARS:
        return f"is longer than {MAX_CANDIDATE_CHARS} characters"
    return text_problem(text)


def _alternative(s: Session, r: ServingResponse) -> ServingResponse | None:
    """The newest showable answer to the same prompt from another arm or model version, with different text."""
    other_arm = or_(ServingResponse.version != r.version, ServingResponse.arm != r.arm)
    if r.arm is None:
        other_arm = or_(other_arm, ServingResponse.arm.is_not(None))
    q = (
        select(ServingResponse)
        .where(
            ServingResponse.prompt_sha256 == r.prompt_sha256,
            ServingResponse.id != r.id,
            ServingResponse.response != r.response,
            other_arm,
        )
        .order_by(ServingResponse.created_at.desc(), ServingResponse.id.desc())
        .limit(50)
    )
    return next((alt for alt in s.scalars(q) if _unshowable(alt.response) is None), None)


def _candidate(cid: str, text: str, model: str | None, version: str | None) -> dict[str, Any]:
    return {"id": cid, "text": text, "model": model, "version": version, "sampling": {}}


def _response_doc(r: ServingResponse) -> dict[str, Any]:
    return {
        "id": r.id,
        "created_at": r.created_at.replace(tzinfo=r.created_at.tzinfo or UTC).isoformat(),
        "model": r.model,
        "version": r.version,
        "arm": r.arm,
        "experiment": r.experiment,
        "user": r.user,
        "prompt": r.prompt,
        "messages": r.messages,
        "response": r.response,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "latency_ms": r.latency_ms,
        "tags": r.tags,
    }


def _sft_row(ext: str, r: ServingResponse, correction: str, meta: str) -> dict[str, Any]:
    if r.messages:
        # A chat request: the SFT row is the conversation with the corrected assistant turn.
        msgs = [{"role": str(m.get("role")), "content": str(m.get("content"))} for m in r.messages]
        return {"id": ext, "prompt": None, "completion": None, "messages": [*msgs, {"role": "assistant",
                "content": correction}], "meta": meta}  # fmt: skip
    return {"id": ext, "prompt": r.prompt, "completion": correction, "messages": None, "meta": meta}


def _policy_edges(store: Store, versions: Iterable[str]) -> list[tuple[str, str]]:
    edges = []
    for v in sorted(set(versions)):
        try:
            edges.append((store.resolve(v), "policy"))
        except StoreError:  # an upstream model or a folder not in the store: nothing to link
            continue
    return edges


def feedback_to_annotation(
    s: Session,
    store: Store,
    project: Any,
    *,
    since: datetime | None = None,
    limit: int | None = None,
    sample_fn: Callable[[str], str] | None = None,
    sample_source: str | None = None,
    negative_kinds: Iterable[str] = NEGATIVE_KINDS,
    low_rating: int = LOW_RATING,
) -> FeedbackToAnnotation:
    """Turn unused negative feedback and corrections into top-priority items of `project` (module docstring).

    `since` keeps feedback given at or after that time; `limit` caps how many feedback events one call uses
    (oldest first; events left waiting for a sample do not count). `sample_fn(prompt) -> text` draws the fresh sample a thumbs-down is compared with when no
    other arm answered the same prompt; `sample_source` names it in the candidate's `version` (e.g. the
    policy's artifact id). Without `sample_fn`, such feedback is left for a later call (`no_alternative`).
    """
    from alignflow.data.formats import SCHEMAS

    kinds = tuple(negative_kinds)
    bad = sorted(set(kinds) - {"thumbs_down", "rating", "regenerate", "abandon"})
    if bad:
        raise services.Invalid(f"negative kinds: {bad} are not negative feedback kinds", "negative_kinds")
    if limit is not None and limit < 1:
        raise services.Invalid(f"limit: expected a positive number, got {limit}", "limit")
    p = services.get_project(s, project)
    if services.schema_spec(s, p).kind != "pairwise":
        raise services.Invalid(
            f"project {p.name!r} is not pairwise; production feedback makes pairwise items"
        )
    q = (
        select(ServingFeedback)
        .where(ServingFeedback.processed_at.is_(None), ServingFeedback.kind.in_((*kinds, "correction")))
        .order_by(ServingFeedback.created_at, ServingFeedback.id)
    )
    if since is not None:
        q = q.where(ServingFeedback.created_at >= (since if since.tzinfo else since.replace(tzinfo=UTC)))
    pending = [fb for fb in s.scalars(q) if fb.kind == "correction" or _is_negative(fb, kinds, low_rating)]
    result = FeedbackToAnnotation()

    # Plan: one item per (response, negative) - several thumbs-down on one reply ask one question - and one
    # item per correction.
    rows: list[dict[str, Any]] = []
    ext_of: dict[int, str] = {}
    used: dict[str, ServingResponse] = {}
    alternatives: dict[str, str] = {}
    sft_rows, pair_rows, fb_docs = [], [], []
    for fb in pending:
        if limit is not None and len(ext_of) >= limit:
            break  # counted in events used, so feedback still waiting for a sample cannot starve the rest
        r = s.get(ServingResponse, fb.response_id)
        problem = _unshowable(r.prompt) or _unshowable(r.response)
        cands: list[dict[str, Any]] = []
        if fb.kind == "correction":
            ext = f"prod-corr-{fb.id}"
            if problem is None:
                cands = [
                    _candidate("original", r.response, r.model, r.version),
                    _candidate("correction", fb.correction or "", "user_correction", None),
                ]
            meta = json.dumps({"response_id": r.id, "feedback_id": fb.id, "version": r.version, "arm": r.arm},
                              sort_keys=True)  # fmt: skip
            sft_rows.append(_sft_row(ext, r, fb.correction or "", meta))
            pair_rows.append({"id": ext, "prompt": r.prompt, "chosen": fb.correction, "rejected": r.response,
                              "weight": 1.0, "meta": meta})  # fmt: skip
        else:
            ext = f"prod-neg-{r.id}"
            if problem is None and ext not in {row["id"] for row in rows}:
                alt = _alternative(s, r)
                if alt is not None:
                    other = _candidate("other", alt.response, alt.model, alt.version)
                    alternatives[r.id] = alt.id
                    used[alt.id] = alt
                else:
                    sample = logs.sanitize_text(sample_fn(r.prompt)) if sample_fn is not None else None
                    if sample is None or sample == r.response or _unshowable(sample):
                        result.no_alternative.append(fb.id)
                        continue
                    other = _candidate("sample", sample, "fresh_sample", sample_source)
                cands = [_candidate("production", r.response, r.model, r.version), other]
        if problem is not None:
            result.unshowable.append(fb.id)
        ext_of[fb.id] = ext
        used[r.id] = r
        fb_docs.append({"id": fb.id, "response_id": r.id, "kind": fb.kind, "rating": fb.rating,
                        "correction": fb.correction, "text": fb.text,
                        "created_at": fb.created_at.replace(tzinfo=fb.created_at.tzinfo or UTC).isoformat()})  # fmt: skip
        if cands:
            rows.append({"id": ext, "prompt": r.prompt, "candidates": cands,
                         "meta": {"production": {"response_id": r.id, "feedback_id": fb.id, "kind": fb.kind,
                                                 "version": r.version, "arm": r.arm}}})  # fmt: skip
    if not ext_of:
        return result

    existing = set(
        s.scalars(
            select(Item.external_id).where(
                Item.project_id == p.id, Item.external_id.in_(list(ext_of.values()))
            )
        )
    )
    new_rows = [row for row in rows if row["id"] not in existing]
    result.linked = [fid for fid, ext in ext_of.items() if ext in existing]
    if new_rows or sft_rows:
        doc = {
            "project": p.name,
            "responses": [_response_doc(r) for r in sorted(used.values(), key=lambda r: r.id)],
            "feedback": fb_docs,
            "alternatives": alternatives,  # disliked response id -> the other arm's response id
            "items": [row["id"] for row in new_rows],
        }
        result.artifact = store.put_json(
            doc,
            kind="production_feedback",
            name=f"production-feedback-{p.name}",
            meta={
                "project": p.name,
                "responses": sorted(used),
                "feedback": [d["id"] for d in fb_docs],
                "items": len(new_rows),
            },
            parents=_policy_edges(store, (r.version for r in used.values())),
        )
        top = int(s.scalar(select(func.max(Item.priority)).where(Item.project_id == p.id)) or 0)
        n = len(new_rows)
        for rank, row in enumerate(new_rows):
            row["priority"] = min(INT32_MAX, top + n - rank)
        if new_rows:
            result.priority = new_rows[0]["priority"]
            services.import_items(s, p, new_rows, source=result.artifact)
            result.items = [row["id"] for row in new_rows]
        parents = [(result.artifact, "production_feedback")]
        import pyarrow as pa

        if sft_rows:
            result.sft = store.put_dataset(
                pa.Table.from_pylist(sft_rows, schema=SCHEMAS["sft"]),
                kind="sft",
                name=f"production-corrections-{p.name}-sft",
                meta={"project": p.name, "operation": "feedback-to-annotation", "format": "sft"},
                parents=parents,
            )
            result.pairs = store.put_dataset(
                pa.Table.from_pylist(pair_rows, schema=SCHEMAS["pairs"]),
                kind="pairs",
                name=f"production-corrections-{p.name}-pairs",
                meta={"project": p.name, "operation": "feedback-to-annotation", "format": "pairs"},
                parents=parents,
            )

    # Mark what was used; a crash before this commit is repaired by the next call (the items exist: linked).
    ids_by_ext = dict(
        s.execute(
            select(Item.external_id, Item.id).where(
                Item.project_id == p.id, Item.external_id.in_(list(set(ext_of.values())))
            )
        ).all()
    )
    now = utcnow()
    try:
        for fid, ext in ext_of.items():
            fb = s.get(ServingFeedback, fid)
            fb.processed_at = now
            fb.item_ids = [ids_by_ext[ext]] if ext in ids_by_ext else []
            fb.artifact_id = result.artifact
        record(s, None, "serving.feedback_to_annotation", "project", p.id,
               {"artifact": result.artifact, "items": result.items, "feedback": sorted(ext_of),
                "sft": result.sft, "pairs": result.pairs})  # fmt: skip
        s.commit()
    except Exception:
        s.rollback()
        raise
    result.processed = sorted(ext_of)
    return result

"""Versioned question schemas and the validation of answers against them.

A schema spec is a JSON object (`SchemaSpec`). Answers arrive in DISPLAY terms (what the annotator saw:
"left"/"right" or display positions) and are converted to the item's CANONICAL order using the display order
stored on the assignment, so position bias can be measured later (`shown_swapped`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_DIMENSIONS = ("accuracy", "professionalism", "conciseness", "empathy")
DEFAULT_FAILURE_TAGS = ("hallucination", "unsafe", "refusal", "off_topic", "formatting", "incomplete")
STRENGTHS = {1: "slight", 2: "clear", 3: "strong"}


class SchemaSpec(BaseModel):
    """The question schema of a project (one version). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["pairwise", "ranking"] = "pairwise"
    allow_tie: bool = True
    dimensions: list[str] = Field(default_factory=lambda: list(DEFAULT_DIMENSIONS))
    failure_tags: list[str] = Field(default_factory=lambda: list(DEFAULT_FAILURE_TAGS))
    rationale_min_chars: int = Field(default=0, ge=0, le=10_000)
    max_candidates: int = Field(default=2, ge=2, le=10)

    @model_validator(mode="after")
    def _check(self) -> SchemaSpec:
        if self.kind == "pairwise" and self.max_candidates != 2:
            raise ValueError("a pairwise schema has max_candidates = 2")
        if len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError(f"dimensions repeat a name: {self.dimensions}")
        if "overall" in self.dimensions:
            raise ValueError("'overall' is the main question, not a dimension")
        return self


Choice = Literal["left", "right", "tie"]


class Answer(BaseModel):
    """An annotator's answer as submitted (display terms). Unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int
    choice: Choice | None = None  # pairwise: which displayed response is better
    strength: int | None = Field(default=None, ge=1, le=3)  # 1 slight, 2 clear, 3 strong
    ranking: list[int] | None = None  # k-way: display positions, best first
    dimensions: dict[str, Choice] = Field(default_factory=dict)
    failure_tags: dict[str, list[str]] = Field(default_factory=dict)  # display position ("0", "1"..) -> tags
    rationale: str = ""
    duration_s: float | None = Field(default=None, ge=0, le=86_400)

    @field_validator("rationale")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.strip()


class AnswerError(ValueError):
    """An answer does not fit its schema; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field '{field}': {message}")
        self.field = field


def parse_answer(raw: dict[str, Any]) -> Answer:
    """Parse a raw JSON answer, turning pydantic errors into one `AnswerError` naming the field."""
    try:
        return Answer.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(body)"
        raise AnswerError(field, err["msg"]) from exc


def canonical_label(
    answer: Answer, spec: SchemaSpec, display_order: list[int], candidate_ids: list[str]
) -> tuple[Any, dict[str, str], bool]:
    """Validate `answer` against `spec` and map it to canonical order.

    Args:
        display_order: `display_order[p]` = canonical candidate index shown at display position p.
        candidate_ids: the item's candidate ids in canonical order.

    Returns:
        `(label, dimension_labels, shown_swapped)`: for pairwise, label in {"A", "B", "tie"} where "A" is
        canonical candidate 0; for ranking, the candidate ids best first.
    """
    n = len(display_order)
    if spec.kind == "pairwise":
        if answer.ranking is not None:
            raise AnswerError("ranking", "not part of a pairwise schema")
        if answer.choice is None:
            raise AnswerError("choice", "required: 'left', 'right' or 'tie'")
        if answer.choice == "tie" and not spec.allow_tie:
            raise AnswerError("choice", "this schema does not allow ties")
        if answer.choice != "tie" and answer.strength is None:
            raise AnswerError(
                "strength", "required when one response is preferred (1 slight, 2 clear, 3 strong)"
            )
        missing = [d for d in spec.dimensions if d not in answer.dimensions]
        extra = [d for d in answer.dimensions if d not in spec.dimensions]
        if extra:
            raise AnswerError(
                f"dimensions.{extra[0]}", f"unknown dimension; this schema has {spec.dimensions}"
            )
        if missing:
            raise AnswerError(f"dimensions.{missing[0]}", "required ('left', 'right' or 'tie')")
        for d, v in answer.dimensions.items():
            if v == "tie" and not spec.allow_tie:
                raise AnswerError(f"dimensions.{d}", "this schema does not allow ties")
        label = _to_canonical(answer.choice, display_order)
        dims = {d: _to_canonical(v, display_order) for d, v in answer.dimensions.items()}
        swapped = list(display_order) == [1, 0]
    else:
        if answer.choice is not None or answer.dimensions:
            raise AnswerError("choice", "a ranking schema takes 'ranking', not 'choice' or 'dimensions'")
        if answer.ranking is None:
            raise AnswerError("ranking", f"required: the {n} display positions, best first")
        if sorted(answer.ranking) != list(range(n)):
            raise AnswerError("ranking", f"must be a permutation of display positions 0..{n - 1}")
        label = [candidate_ids[display_order[p]] for p in answer.ranking]
        dims = {}
        swapped = list(display_order) != sorted(display_order)
    allowed = set(spec.failure_tags)
    for pos, tags in answer.failure_tags.items():
        # isascii: "²" and other Unicode digits pass isdigit() but not int().
        if not (pos.isascii() and pos.isdigit()) or int(pos) >= n:
            raise AnswerError(f"failure_tags.{pos}", f"key must be a display position 0..{n - 1}")
        bad = [t for t in tags if t not in allowed]
        if bad:
            raise AnswerError(f"failure_tags.{pos}", f"unknown tag {bad[0]!r}; allowed {sorted(allowed)}")
    if len(answer.rationale) < spec.rationale_min_chars:
        raise AnswerError(
            "rationale",
            f"at least {spec.rationale_min_chars} characters required, got {len(answer.rationale)}",
        )
    return label, dims, swapped


def _to_canonical(choice: str, display_order: list[int]) -> str:
    if choice == "tie":
        return "tie"
    shown = display_order[0] if choice == "left" else display_order[1]
    return "A" if shown == 0 else "B"


def canonical_tags(
    answer: Answer, display_order: list[int], candidate_ids: list[str]
) -> dict[str, list[str]]:
    """Failure tags keyed by candidate id instead of display position."""
    return {candidate_ids[display_order[int(p)]]: sorted(set(t)) for p, t in answer.failure_tags.items() if t}

"""Input limits shared by the request models (so they appear in the OpenAPI schema) and the services (so the
CLI and library callers meet the same ones), chosen so SQLite and PostgreSQL accept exactly the same input.

PostgreSQL refuses NUL characters in text and 32-bit overflows in INTEGER columns where SQLite stores them
(or returns every row for `LIMIT -1`), so both limits are enforced before a query is built. Lone surrogates
cannot be encoded as UTF-8; pydantic refuses them in every `str` field, and `check_text` does for the rest.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

NO_NUL = r"^[^\x00]*$"
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
ITEM_ID_CHARS = 128
PROJECT_NAME_CHARS = 128
USERNAME_CHARS = 64
POD_CHARS = 64
CANDIDATE_ID_CHARS = 256  # candidate ids, model names and versions
MAX_CANDIDATE_CHARS = 100_000
MAX_LEASE_SECONDS = 7 * 24 * 3600  # a week; beyond that an abandoned task would never come back
MAX_PROMPT_CHARS = 200_000

Text = Annotated[str, Field(pattern=NO_NUL)]
Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]


def text_problem(value: Any) -> str | None:
    """Why `value` cannot be stored as text on every backend (NUL, lone surrogate), or None if it can."""
    if not isinstance(value, str):
        return None
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode)"
    return None


def first_text_problem(value: Any, path: str = "") -> tuple[str, str] | None:
    """The first string inside a JSON-like value (keys included) that `text_problem` refuses, with its path."""
    if isinstance(value, str):
        problem = text_problem(value)
        return (path, problem) if problem else None
    if isinstance(value, dict):
        for k, v in value.items():
            found = first_text_problem(k, path) or first_text_problem(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = first_text_problem(v, f"{path}[{i}]")
            if found:
                return found
    return None

"""Helpers shared by the feedback tests (users, items, valid answers)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from alignflow.feedback import auth

PASSWORD = "correct-horse-battery"


def make_users(s: Session, spec: dict[str, str | tuple[str, str | None]]) -> dict[str, int]:
    """Create users {name: role} or {name: (role, pod)}; returns their ids."""
    ids = {}
    for name, role in spec.items():
        role, pod = role if isinstance(role, tuple) else (role, "pod1")
        ids[name] = auth.create_user(s, name, PASSWORD, role, pod=pod).id
    s.commit()
    return ids


def pair_items(n: int, prefix: str = "i", gold: int = 0) -> list[dict]:
    rows = [
        {
            "id": f"{prefix}{k}",
            "prompt": f"prompt {k}",
            "candidates": [
                {
                    "id": "a",
                    "text": f"answer A{k}",
                    "model": "m1",
                    "version": "1",
                    "sampling": {"temperature": 0.7},
                },
                {
                    "id": "b",
                    "text": f"answer B{k}",
                    "model": "m2",
                    "version": "1",
                    "sampling": {"temperature": 0.7},
                },
            ],
        }
        for k in range(n)
    ]
    for k in range(gold):
        rows.append({**rows[0], "id": f"{prefix}gold{k}", "prompt": f"prompt {1000 + k}", "gold_label": "A"})
    return rows


def answer(task: dict, choice: str = "left", **extra) -> dict:
    """A valid pairwise answer for `task` in display terms."""
    body = {
        "schema_version": task["schema_version"],
        "choice": choice,
        "strength": None if choice == "tie" else 2,
        "dimensions": {d: choice for d in task["schema"]["dimensions"]},
        "rationale": "the left one is more accurate and more concise",
        "duration_s": 3.5,
    }
    body.update(extra)
    return body

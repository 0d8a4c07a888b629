"""preferences_to_pairs: soft label as weight, the two tie rules, ranking rows, and valid `pairs` rows."""

from __future__ import annotations

import json

import pytest

from alignflow.data.formats import normalize_record
from alignflow.feedback.export import preferences_to_pairs


def _pref(item_id: str, label: str, p_a: float | None, chosen: str = "good", rejected: str = "bad") -> dict:
    return {
        "item_id": item_id,
        "prompt": f"prompt {item_id}",
        "chosen": chosen,
        "rejected": rejected,
        "label": label,
        "p_a": p_a,
        "n_votes": 3,
        "method": "dawid_skene",
    }


ROWS = [
    _pref("q1", "A", 0.9),
    _pref("q2", "B", 0.2),  # consensus B: chosen is candidate B, P(B better) = 1 - 0.2
    _pref("q3", "tie", 0.5, chosen="first", rejected="second"),
    _pref("r1", json.dumps(["c2", "c1", "c3"]), None),  # a ranking row: Borda top over bottom
]


def test_weights_are_the_probability_that_chosen_is_better():
    pairs = preferences_to_pairs(ROWS)
    by_id = {p["id"]: p for p in pairs}
    assert by_id["q1"]["weight"] == pytest.approx(0.9)
    assert by_id["q2"]["weight"] == pytest.approx(0.8)
    assert by_id["r1"]["weight"] == 1.0
    assert (by_id["q2"]["chosen"], by_id["q2"]["rejected"]) == ("good", "bad")
    assert json.loads(by_id["q1"]["meta"]) == {"n_votes": 3, "method": "dawid_skene"}


def test_ties_are_dropped_by_default():
    assert [p["id"] for p in preferences_to_pairs(ROWS)] == ["q1", "q2", "r1"]


def test_tie_rule_both_keeps_both_orders_at_half_weight():
    pairs = preferences_to_pairs(ROWS, tie_rule="both")
    ties = [p for p in pairs if p["id"].startswith("q3")]
    assert [(p["id"], p["chosen"], p["rejected"], p["weight"]) for p in ties] == [
        ("q3/ab", "first", "second", 0.5),
        ("q3/ba", "second", "first", 0.5),
    ]
    assert len(pairs) == 5


def test_unknown_tie_rule_is_an_error():
    with pytest.raises(ValueError, match="tie_rule"):
        preferences_to_pairs(ROWS, tie_rule="a_wins")  # type: ignore[arg-type]


def test_rows_are_valid_pairs_records():
    for i, row in enumerate(preferences_to_pairs(ROWS, tie_rule="both")):
        norm = normalize_record("pairs", row, default_id=str(i))
        assert (norm["id"], norm["chosen"], norm["rejected"], norm["weight"]) == (
            row["id"],
            row["chosen"],
            row["rejected"],
            row["weight"],
        )

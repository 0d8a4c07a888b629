"""The report's diagnosis under the per-dimension table: which dimensions greedy decoding leaves room on, and
what the reward model's heads see of them; rendered by the report writer."""

from __future__ import annotations

from alignflow.domains.quickstart import headroom_note
from alignflow.evaluate.report import write_report


def _ev(greedy_sft: dict[str, float]) -> dict:
    return {
        "dimensions": {"greedy": {"sft": {"utility": 0.7, **greedy_sft}}},
        "reward_model": {
            "per_dimension": {
                "accuracy": {"agreement": 0.64, "n_pairs": 118, "head_agreement": 0.73},
                "professionalism": {"agreement": 0.91, "n_pairs": 159, "head_agreement": 0.99},
                "conciseness": {"agreement": 0.68, "n_pairs": 146, "head_agreement": 0.98},
                "empathy": {"agreement": 0.78, "n_pairs": 81, "head_agreement": 0.975},
            }
        },
    }


def test_note_names_the_open_dimension_and_what_the_heads_see() -> None:
    ev = _ev({"accuracy": 0.334, "professionalism": 1.0, "conciseness": 1.0, "empathy": 0.997})
    note = headroom_note(ev)
    assert "scores ≥ 0.99 on professionalism, conciseness, empathy" in note
    assert "only through accuracy (0.334)" in note
    assert "accuracy head orders gold accuracy correctly on 73%" in note and "overall head 64%" in note
    assert "98%–99% for the saturated dimensions' heads" in note


def test_no_note_without_greedy_or_without_saturation() -> None:
    assert headroom_note({}) == ""
    assert (
        headroom_note(_ev({"accuracy": 0.3, "professionalism": 0.5, "conciseness": 0.8, "empathy": 0.7}))
        == ""
    )
    # A single-head reward model: the note says what the one model sees.
    ev = _ev({"accuracy": 0.3, "professionalism": 1.0, "conciseness": 1.0, "empathy": 1.0})
    for d in ev["reward_model"]["per_dimension"].values():
        d.pop("head_agreement")
    assert "the reward model orders gold accuracy correctly on 64%" in headroom_note(ev)


def test_report_renders_the_note_under_the_dimension_table(tmp_path) -> None:
    rows = [{"policy": "sft", "decoding": "greedy", "utility": 0.7, "accuracy": 0.3}]
    path = write_report(
        tmp_path, {"title": "t", "dimensions": rows, "dimension_note": "Only accuracy can rise."}
    )
    assert "Only accuracy can rise." in path.read_text()

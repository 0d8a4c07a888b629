"""Bad input fails with the row and column named; degenerate agreement is reported as undefined, never NaN."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from alignflow.quality.agreement import (
    agreement_by,
    agreement_summary,
    cohen_kappa_matrix,
    reliability_matrix,
)
from alignflow.quality.schema import JudgmentError, load_judgments, validate_judgments, write_judgments


def _frame(labels, annotators=None):
    annotators = annotators or [f"w{i}" for i in range(len(labels))]
    return pd.DataFrame({"item_id": ["i1"] * len(labels), "annotator_id": annotators, "label": labels})


def test_unknown_item_and_annotator_named():
    df = pd.DataFrame(
        {"item_id": ["i1", "i2", "i9"], "annotator_id": ["a", "b", "a"], "label": ["A", "B", "tie"]}
    )
    with pytest.raises(JudgmentError, match=r"row 2, column 'item_id': unknown item 'i9'"):
        validate_judgments(df, items=["i1", "i2"])
    with pytest.raises(JudgmentError, match=r"row 1, column 'annotator_id': unknown annotator 'b'"):
        validate_judgments(df, annotators=pd.DataFrame({"annotator_id": ["a"]}))


def test_wrong_label_values_named():
    with pytest.raises(JudgmentError, match=r"row 1, column 'label'.*'C'"):
        validate_judgments(
            pd.DataFrame(
                {
                    "item_id": ["i", "i"],
                    "annotator_id": ["a", "b"],
                    "label": ["A", "C"],
                    "kind": ["pairwise", "pairwise"],
                }
            )
        )
    with pytest.raises(JudgmentError, match=r"row 0, column 'kind'"):
        validate_judgments(
            pd.DataFrame({"item_id": ["i"], "annotator_id": ["a"], "label": ["A"], "kind": ["vote"]})
        )
    with pytest.raises(JudgmentError, match=r"row 0, column 'gold_label'"):
        validate_judgments(
            pd.DataFrame({"item_id": ["i"], "annotator_id": ["a"], "label": ["A"], "is_gold": [True]})
        )
    with pytest.raises(JudgmentError, match=r"missing required column"):
        validate_judgments(pd.DataFrame({"item_id": ["i"], "label": ["A"]}))
    with pytest.raises(JudgmentError, match=r"row 1, column 'annotator_id'.*more than once"):
        validate_judgments(
            pd.DataFrame({"item_id": ["i", "i"], "annotator_id": ["a", "a"], "label": ["A", "B"]})
        )


def test_jsonl_error_names_file_and_line(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"item_id": "i", "annotator_id": "a", "label": "A"}\n{not json\n')
    with pytest.raises(JudgmentError, match=r"j.jsonl:2: invalid JSON"):
        load_judgments(path)


def test_roundtrip_jsonl_parquet(tmp_path):
    df = validate_judgments(
        pd.DataFrame(
            {
                "item_id": ["i1", "i1", "i2"],
                "annotator_id": ["a", "b", "a"],
                "label": [["x", "y"], ["y", "x"], ["x", "y"]],
                "created_at": ["2024-01-01T00:00:00Z"] * 3,
            }
        )
    )
    for name in ("j.jsonl", "j.parquet"):
        back = load_judgments(write_judgments(df, tmp_path / name))
        assert back["label"].tolist() == [["x", "y"], ["y", "x"], ["x", "y"]]
        assert (back["kind"] == "ranking").all()


def _assert_no_nan(table: pd.DataFrame):
    for col in table.columns:
        for v in table[col]:
            assert not (isinstance(v, float) and math.isnan(v)), f"NaN in column {col}"


def test_single_annotator_is_undefined_with_reason():
    df = validate_judgments(
        pd.DataFrame({"item_id": ["i1", "i2"], "annotator_id": ["a", "a"], "label": ["A", "B"]})
    )
    out = agreement_summary(df)
    assert out["alpha"] is None and "only 1 annotator" in out["alpha_note"]
    table = agreement_by(df.assign(project="p"), "project")
    _assert_no_nan(table)
    assert table["fleiss_kappa"].iat[0] is None


def test_all_identical_labels_is_undefined_with_reason():
    df = validate_judgments(
        pd.DataFrame(
            {"item_id": ["i1", "i1", "i2", "i2"], "annotator_id": ["a", "b", "a", "b"], "label": ["A"] * 4}
        )
    )
    out = agreement_summary(df)
    assert out["percent_agreement"] == 1.0
    assert out["fleiss_kappa"] is None and "chance agreement is 1" in out["fleiss_kappa_note"]
    assert out["alpha"] is None and "same value" in out["alpha_note"]
    kappas = cohen_kappa_matrix(reliability_matrix(df))
    _assert_no_nan(kappas)
    assert kappas["kappa"].iat[0] is None and kappas["kappa_note"].iat[0]

import json

import pytest

from switchkd.training.evaluate import format_table, rouge_l, score, write_report


def test_rouge_l_is_stemmed_and_takes_the_best_reference():
    assert rouge_l("the cats are running", ["the cat is run"]) == pytest.approx(rouge_l("the cat is run",
                                                                                       ["the cat is run"]) * 0.75)
    assert rouge_l("a b c", ["x y z"]) == 0.0
    assert rouge_l("a b c", ["x y z", "a b c"]) == 1.0


def test_score_buckets_by_reference_length():
    report = score(["a b", "c d e", "x"], [["a b"], ["c d f"], ["y"]], [3, 20, 200], buckets=(16, 64))
    assert report["overall"]["n"] == 3
    assert report["overall"]["exact_match"] == pytest.approx(1 / 3)
    assert report["by_length"]["0-15"] == {"n": 1, "rougeL": 1.0, "exact_match": 1.0}
    assert report["by_length"]["16-63"]["rougeL"] == pytest.approx(2 / 3)
    assert report["by_length"]["64+"]["rougeL"] == 0.0
    assert "overall" in format_table(report) and "64+" in format_table(report)


def strict_json(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_empty_buckets_are_null_and_the_report_is_strict_json(tmp_path):
    report = score(["a b"], [["a b"]], [3], buckets=(16, 64))
    assert report["by_length"]["16-63"] == {"n": 0, "rougeL": None, "exact_match": None}
    report["settings"] = {"temperature": float("nan")}  # anything non-finite becomes null too
    write_report(report, tmp_path / "scores.json")
    parsed = strict_json((tmp_path / "scores.json").read_text())
    assert parsed["by_length"]["64+"]["rougeL"] is None and parsed["settings"]["temperature"] is None
    table = format_table(report)
    assert "ROUGE-L %" in table and "100.00" in table and " -" in table.splitlines()[3]

"""Smoke run of benchmarks/quality.py --quick on the shipped assets: every method trains, gets finite
scores and a paired comparison with SWITCH; the report states its regime checks and verdicts."""

import importlib.util
import json
import math

import numpy as np
import pytest


def test_quick_quality_report(tmp_path, reference_backend):
    import quality  # benchmarks/ is on sys.path (conftest)

    out = tmp_path / "quality-quick.json"
    quality.main(["--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["mode"] == "quick" and set(report["methods"]) == set(quality.METHODS)
    assert report["chosen"] in report["sweep"]
    for name, method in report["methods"].items():
        assert math.isfinite(method["rougeL"]["mean"]) and 0.0 <= method["rougeL"]["mean"] <= 1.0, name
        assert math.isfinite(method["exact_match"]["mean"]), name
        assert set(method["by_length"]) == set(report["teacher"]["by_length"])
        assert method["seconds"]["mean"] > 0
    assert report["methods"]["SeqKD"]["teacher_share"]["mean"] == 1.0
    assert report["methods"]["GKD"]["teacher_share"]["mean"] == 0.0
    assert set(report["paired"]) == set(quality.METHODS) - {"SWITCH"}
    for cmp in report["paired"].values():
        for ci in [cmp["rougeL"], cmp["exact_match"], *cmp["by_length"].values()]:
            assert ci["low"] <= ci["mean"] + 1e-12 and ci["mean"] <= ci["high"] + 1e-12
    verdicts = {c[k]["verdict"] for c in report["claims"] for k in ("beats_overall", "beats_longest") if k in c}
    assert verdicts and verdicts <= {"supported", "contradicted", "not resolved"}
    assert [c["method"] for c in report["claims"]] == list(report["paired"])
    assert [c["check"] for c in report["regime"]][0].startswith("teacher exact match")
    text = out.with_suffix(".md").read_text()
    assert "| SWITCH |" in text and "Paired differences" in text and "Claims" in text
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").is_file()


def test_paired_bootstrap_finds_a_real_difference_and_not_a_null_one():
    import quality_report

    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(5, 280, 90)]
    base = rng.uniform(0.2, 0.8, (3, 90))
    runs = [{"seed": s, "rows": {"rougeL": list(base[s]), "exact": [0.0] * 90}} for s in range(3)]
    better = [{"seed": s, "rows": {"rougeL": list(base[s] + 0.05 + 0.001 * np.array(lengths)), "exact": [1.0] * 90}}
              for s in range(3)]
    up = quality_report.paired(better, runs, lengths)
    assert up["rougeL"]["low"] > 0 and up["exact_match"]["mean"] == pytest.approx(1.0)
    assert up["long_minus_short"]["low"] > 0  # the gain grows with the reference length
    noise = [{"seed": s, "rows": {"rougeL": list(base[s] + rng.normal(0, 0.05, 90)), "exact": [0.0] * 90}}
             for s in range(3)]
    null = quality_report.paired(noise, runs, lengths)
    assert null["rougeL"]["low"] < 0 < null["rougeL"]["high"]
    assert quality_report.bucket(31) == "0-31" and quality_report.bucket(192) == "192+"


def test_device_mode_trains_its_own_teacher_and_student_start():
    import build_assets
    from transformers import AutoTokenizer

    import quality

    tokenizer = AutoTokenizer.from_pretrained(build_assets.ASSETS / "tokenizer")
    data = build_assets.datasets(tokenizer, rows=(64, 4, 4), names=["train"])
    cfg = {"teacher": (1, 32), "student": (1, 32), "teacher_steps": 2, "sft_steps": 2}
    teacher, start = quality.load_models(cfg, tokenizer, data, "cpu")
    assert not teacher.training and teacher.config.hidden_size == start.config.hidden_size == 32

"""Smoke run of benchmarks/quality.py --quick: every method trains and gets finite scores."""

import importlib.util
import json
import math


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
    assert "| SWITCH |" in out.with_suffix(".md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").is_file()

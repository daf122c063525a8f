"""The shipped quality-benchmark assets (benchmarks/assets/, built by benchmarks/build_assets.py):
every file matches the manifest's checksum, and the shipped models reproduce their recorded greedy
scores on the first rows of the test split (CPU, well under a minute)."""

import hashlib
import json

import build_assets  # benchmarks/ is on sys.path (conftest)
import pytest

MANIFEST = build_assets.ASSETS / "manifest.json"


@pytest.fixture(scope="module")
def manifest():
    return json.loads(MANIFEST.read_text())


def test_files_match_the_manifest(manifest):
    shipped = sorted(str(p.relative_to(build_assets.ASSETS)) for p in build_assets.ASSETS.rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    assert shipped == sorted(manifest["files"])
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((build_assets.ASSETS / name).read_bytes()).hexdigest() == digest, name
    assert sum((build_assets.ASSETS / n).stat().st_size for n in manifest["files"]) < 8 * 2**20  # a few MB


def test_manifest_records_the_recipe_and_the_regime(manifest):
    assert manifest["rows"] == list(build_assets.ROWS) and manifest["seed"] == build_assets.SEED
    assert manifest["max_new_tokens"] == build_assets.MAX_NEW and manifest["subset"] == build_assets.SUBSET
    teacher, student = manifest["teacher"]["test"]["overall"], manifest["student"]["test"]["overall"]
    assert teacher["exact_match"] >= 0.5  # the teacher solves most test prompts
    assert student["rougeL"] >= 0.6 * teacher["rougeL"] and student["exact_match"] < teacher["exact_match"]


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_shipped_model_reproduces_its_recorded_score(manifest, name):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(build_assets.ASSETS / "tokenizer")
    model = LlamaForCausalLM.from_pretrained(build_assets.ASSETS / name).eval()
    test = build_assets.datasets(tokenizer, names=["test"])["test"]
    got = build_assets.greedy_score(model, tokenizer, test, limit=manifest["subset"])
    want = manifest[name][f"test_first_{manifest['subset']}"]
    assert got["overall"]["n"] == want["overall"]["n"] == manifest["subset"]
    assert got["overall"]["rougeL"] == pytest.approx(want["overall"]["rougeL"], abs=5e-3)
    assert got["overall"]["exact_match"] == pytest.approx(want["overall"]["exact_match"], abs=1.5 / manifest["subset"])

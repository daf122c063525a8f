import json
import subprocess
import sys

import pytest

from switchkd.cli import build_parser, main

from models import REVERSE_ROWS, char_gpt2, char_tokenizer


@pytest.fixture(autouse=True)
def _reference(reference_backend):
    """Model-level tests run the reference ops; the kernels have their own tests (the interpreter is slow)."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = char_tokenizer()
    for name, model in (("teacher", char_gpt2(2, 64, seed=1)), ("student", char_gpt2(1, 32, seed=2))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REVERSE_ROWS))
    return root


def test_distill_then_eval_writes_a_score_file(workdir, capsys):
    out = workdir / "distilled"
    assert main(["distill", "--teacher", str(workdir / "teacher"), "--student", str(workdir / "student"),
                 "--train", str(workdir / "train.jsonl"), "--output-dir", str(out), "--max-steps", "3",
                 "--batch-size", "4", "--max-new-tokens", "6", "--cpu", "--logging-steps", "1"]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    scores = workdir / "scores.json"
    assert main(["eval", "--model", str(out), "--data", str(workdir / "train.jsonl"), "--out", str(scores),
                 "--max-new-tokens", "8"]) == 0
    report = json.loads(scores.read_text())
    assert report["overall"]["n"] == len(REVERSE_ROWS) and 0.0 <= report["overall"]["rougeL"] <= 1.0
    assert len(report["predictions"]) == len(REVERSE_ROWS) and "ROUGE-L" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "--prompt", "reverse abc:", "--max-new-tokens", "4"]) == 0


@pytest.mark.parametrize("argv, match", [
    (["eval", "--model", "/nonexistent/model", "--data", "{w}/train.jsonl"], "has no config.json"),
    (["distill", "--teacher", "{w}/teacher", "--student", "{w}/student", "--train", "{w}/missing.jsonl",
      "--output-dir", "{w}/o", "--cpu"], "no such training data file"),
])
def test_errors_are_one_readable_line(workdir, capsys, argv, match):
    assert main([a.format(w=workdir) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("switchkd: error:") and match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_incompatible_models_are_reported(workdir, capsys):
    big = char_gpt2(1, 32, seed=3, vocab=120)
    big.save_pretrained(workdir / "other")
    char_tokenizer().save_pretrained(workdir / "other")
    assert main(["distill", "--teacher", str(workdir / "other"), "--student", str(workdir / "student"), "--train",
                 str(workdir / "train.jsonl"), "--output-dir", str(workdir / "o2"), "--cpu"]) == 2
    assert "vocabularies differ" in capsys.readouterr().err


def test_help_documents_every_option():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} --{action.dest} has no help"
    proc = subprocess.run([sys.executable, "-m", "switchkd.cli", "distill", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--tau0" in proc.stdout and "--source" in proc.stdout

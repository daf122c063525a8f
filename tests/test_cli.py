import dataclasses
import json
import sys
import types

import pytest
from transformers import TrainingArguments

from switchkd import SwitchKDConfig
from switchkd.cli import DistillArguments, EvalArguments, GenerateArguments, build_parser, main

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


def distill_argv(workdir, out, *extra):
    return ["distill", "--teacher", str(workdir / "teacher"), "--student", str(workdir / "student"), "--train",
            str(workdir / "train.jsonl"), "--output-dir", str(out), "--max-steps", "3",
            "--per-device-train-batch-size", "4", "--max-new-tokens", "6", "--use-cpu", "--logging-steps", "1",
            "--disable-tqdm", "true", *extra]


def test_distill_then_eval_writes_a_score_file(workdir, capsys):
    out = workdir / "distilled"
    assert main(distill_argv(workdir, out, "--eval-file", str(workdir / "train.jsonl"), "--eval-steps", "3")) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert any("eval_loss" in h for h in history)  # --eval-file scored during training
    scores = workdir / "scores.json"
    assert main(["eval", "--model", str(out), "--data", str(workdir / "train.jsonl"), "--out", str(scores),
                 "--max-new-tokens", "8"]) == 0
    report = json.loads(scores.read_text())
    assert report["overall"]["n"] == len(REVERSE_ROWS) and 0.0 <= report["overall"]["rougeL"] <= 1.0
    assert len(report["predictions"]) == len(REVERSE_ROWS) and "ROUGE-L" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "--prompt", "reverse abc:", "--max-new-tokens", "4"]) == 0


@pytest.mark.parametrize("argv, match", [
    (["eval", "--model", "/nonexistent/model", "--data", "{w}/train.jsonl"], "--model /nonexistent/model: cannot"),
    (["distill", "--teacher", "{w}/teacher", "--student", "{w}/student", "--train", "{w}/missing.jsonl",
      "--output-dir", "{w}/o", "--use-cpu"], "--train: no such file"),
    (["distill", "--teacher", "{w}/teacher", "--student", "{w}/student", "--train", "{w}/train.jsonl",
      "--use-cpu"], "--output-dir is required"),
    (["generate", "--model", "{w}/student"], "give exactly one of --prompt and --data"),
])
def test_errors_are_one_readable_line(workdir, capsys, argv, match):
    assert main([a.format(w=workdir) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("switchkd: error:") and match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def option(parser, command, dest):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return next((a for a in sub._actions if a.dest == dest), None)


@pytest.mark.parametrize("command, classes", [
    ("distill", [DistillArguments, SwitchKDConfig]), ("generate", [GenerateArguments]), ("eval", [EvalArguments])])
def test_every_field_is_a_flag_with_the_field_default_and_help(command, classes):
    parser = build_parser(commands=(command,))
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)} - {"logging_steps", "overwrite_output_dir"}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            action = option(parser, command, f.name)
            assert action is not None, f"{command}: no flag for {f.name}"
            assert f"--{f.name.replace('_', '-')}" in action.option_strings and action.help
            if f.name not in inherited and f.default is not dataclasses.MISSING:
                assert action.default == f.default, f.name  # the dataclass is the one source of defaults
    for name in ("tau0", "source", "lmbda", "seq_kd", "bf16", "gradient_checkpointing", "warmup_ratio",
                 "model_init_kwargs", "teacher_model_init_kwargs", "overwrite_output_dir", "resume", "eval_file"):
        assert option(build_parser(), "distill", name) is not None, name


def test_help_shows_defaults_and_the_jsd_scale(capsys):
    with pytest.raises(SystemExit) as done:
        main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "--tau0" in text and "--source {switch,student,teacher,dataset,adaptive}" in text
    assert "(default: 0.3)" in text and "ln 2" in text and "--per-device-train-batch-size" in text
    assert "usage: switchkd distill --teacher" in text


def test_bench_passes_its_options_to_the_throughput_script(capsys, monkeypatch, tmp_path):
    with pytest.raises(SystemExit) as done:
        main(["bench", "--sections", "decode", "--help"])
    assert done.value.code == 0 and "--sections" in capsys.readouterr().out  # throughput.py's own help
    calls = []
    fake = types.SimpleNamespace(run=lambda section, ctx: calls.append((section, ctx.device)) or [])
    monkeypatch.setitem(sys.modules, "decode", fake)  # the decode section itself takes minutes on CPU
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert main(["bench", "--sections", "decode", "--device", "cpu", "--no-compile", "--out",
                 str(tmp_path / "bench.json")]) == 0
    assert calls == [("decode", "cpu")] and json.loads((tmp_path / "bench.json").read_text())["rows"] == []

"""What a practitioner runs into: re-runs, crashes during a save, tokenizers, chat data, LoRA, bad input, TRL's
names, the scores file. Tiny models and tokenizers built here; the CLI is called in-process."""

import json
import string

import pytest
import torch
from transformers import Trainer

from switchkd import SwitchKDConfig, SwitchKDTrainer
from switchkd.cli import main
from switchkd.training.checkpoints import is_complete, latest_complete
from switchkd.training.data import DistillDataset
from switchkd.training.evaluate import generate_responses

from models import REVERSE_ROWS, char_gpt2, char_tokenizer

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(autouse=True)
def _reference(reference_backend):
    """Model-level tests run the reference ops; the kernels have their own tests (the interpreter is slow)."""


def save(root, name, model, tokenizer):
    model.save_pretrained(root / name)
    tokenizer.save_pretrained(root / name)
    return root / name


def reversed_char_tokenizer():
    """A tokenizer of the same size as char_tokenizer() but other ids: a different tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for piece in reversed(string.printable):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("practitioner")
    tok = char_tokenizer()
    save(root, "teacher", char_gpt2(2, 64, seed=1), tok)
    save(root, "student", char_gpt2(1, 32, seed=2), tok)
    save(root, "padded_teacher", char_gpt2(2, 64, seed=1, vocab=128), tok)
    save(root, "other_tokenizer", char_gpt2(2, 64, seed=1), reversed_char_tokenizer())
    chat = char_tokenizer()
    chat.chat_template = TEMPLATE
    save(root, "chat_teacher", char_gpt2(2, 64, seed=1), chat)
    save(root, "chat_student", char_gpt2(1, 32, seed=2), chat)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REVERSE_ROWS))
    messages = [{"messages": [{"role": "system", "content": "reverse"}, {"role": "user", "content": w[::-1]},
                              {"role": "assistant", "content": w}]} for w in (r["response"] for r in REVERSE_ROWS)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in messages))
    return root


def distill(work, out, *extra, teacher="teacher", student="student", train="train.jsonl"):
    return main(["distill", "--teacher", str(work / teacher), "--student", str(work / student), "--train",
                 str(work / train), "--output-dir", str(out), "--max-steps", "2", "--per-device-train-batch-size",
                 "4", "--max-new-tokens", "5", "--use-cpu", "--disable-tqdm", "true", "--save-steps", "1", *extra])


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("switchkd: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ----------------------------------------------------------------------------------------- 1. re-runs
def test_a_rerun_is_refused_and_overwrite_output_dir_replaces_the_run(work, tmp_path, capsys):
    out = tmp_path / "run"
    assert distill(work, out) == 0
    before = {p: (out / p).read_bytes() for p in files_under(out) if (out / p).is_file()}
    capsys.readouterr()
    assert distill(work, out, "--max-steps", "1") == 2
    one_line_error(capsys, "--output-dir", "is not empty", "--resume latest", "--overwrite-output-dir")
    assert {p: (out / p).read_bytes() for p in files_under(out) if (out / p).is_file()} == before
    assert distill(work, out, "--max-steps", "1", "--overwrite-output-dir") == 0
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]  # no checkpoint-2 of the old run


def test_the_trainer_refuses_checkpoints_of_another_run(tmp_path):
    (tmp_path / "out" / "checkpoint-40").mkdir(parents=True)
    trainer = tiny_trainer(tmp_path, save_strategy="steps", save_steps=1)
    with pytest.raises(ValueError, match="is not empty"):
        trainer.train()
    assert (tmp_path / "out" / "checkpoint-40").is_dir()


# ------------------------------------------------------------------------------ 2. resume after a crash
def test_resume_latest_skips_a_half_written_checkpoint(work, tmp_path, capsys):
    out = tmp_path / "run"
    assert distill(work, out) == 0
    half = out / "checkpoint-2"
    for path in half.iterdir():  # as after kill -9 during the save: only the config files are there
        if path.name not in ("config.json", "generation_config.json"):
            path.unlink()
    assert latest_complete(out) == (out / "checkpoint-1", [half])
    capsys.readouterr()
    assert distill(work, out, "--max-steps", "3", "--resume", str(half)) == 2
    one_line_error(capsys, "incomplete checkpoint", "--resume latest")
    assert distill(work, out, "--max-steps", "3", "--resume", "latest") == 0
    assert f"resuming from {out / 'checkpoint-1'} (skipped incomplete checkpoint-2)" in capsys.readouterr().out
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and is_complete(out / "checkpoint-3") and is_complete(out / "checkpoint-2")


def test_a_save_interrupted_midway_leaves_no_complete_checkpoint(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, save_strategy="steps", save_steps=1)

    def crash(self, output_dir):
        raise KeyboardInterrupt  # Ctrl-C between the weights and the optimizer
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert (checkpoint / "model.safetensors").is_file() and not is_complete(checkpoint)
    assert latest_complete(tmp_path / "out") == (None, [checkpoint])
    (checkpoint / "model.safetensors").write_bytes(b"x")  # a truncated file fails the size check too
    with pytest.raises(ValueError, match="no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


# ----------------------------------------------------------------------------------------- 3. tokenizers
def test_a_padded_teacher_is_accepted_and_a_different_tokenizer_refused(work, tmp_path, capsys):
    assert distill(work, tmp_path / "padded", teacher="padded_teacher") == 0
    capsys.readouterr()
    assert distill(work, tmp_path / "other", teacher="other_tokenizer") == 2
    one_line_error(capsys, "tokenizers differ", "103 vs 103 tokens")
    assert not (tmp_path / "other").exists()


def test_padded_rows_stay_out_of_the_loss_and_of_teacher_sampling(tmp_path):
    tok = char_tokenizer()
    trainer = tiny_trainer(tmp_path, teacher=char_gpt2(2, 64, seed=1, vocab=128), student=char_gpt2(1, 32, seed=2,
                                                                                                   vocab=110))
    assert trainer.vocab_size == len(tok) == 103
    assert trainer.teacher.get_output_embeddings().weight.shape[0] == 128  # the user's teacher is left as it is
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():  # huge logits on the padded columns change nothing when they are left out
        trainer.model.lm_head.weight[103:] *= 100
        trainer.teacher.lm_head.weight[103:] *= 100
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), loss)
    responses = generate_responses(trainer.model, tok, [[5, 6, 7]] * 4, max_new_tokens=6, temperature=1.0)
    assert all(t < 103 for r in responses for t in r)  # switchkd generate/eval never sample the padded rows


def test_a_padded_student_trains_with_switch_and_never_samples_a_padded_id(tmp_path, monkeypatch):
    from switchkd.decoding.generator import SwitchGenerator

    student = char_gpt2(1, 32, seed=2, vocab=120)  # 17 padded rows past the tokenizer's 103 tokens
    with torch.no_grad():
        student.lm_head.weight[103:] = torch.randn(17, 32) * 60  # huge padded logits
        assert (student(torch.tensor([[5, 6, 7, 8]])).logits.argmax(-1) >= 103).any()
    seen = []
    generate = SwitchGenerator.generate

    def spy(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        seen.append((self.vocab_size, out.responses))
        return out

    monkeypatch.setattr(SwitchGenerator, "generate", spy)
    trainer = tiny_trainer(tmp_path, student=student, source="switch")  # the teacher has the tokenizer's 103 rows
    trainer.train()
    assert trainer.teacher.get_output_embeddings().weight.shape[0] == 103  # not resized: decoding slices instead
    assert len(seen) == 2 and all(vocab == 103 for vocab, _ in seen)
    tokens = [t for _, responses in seen for r in responses for t in r]
    assert tokens and max(tokens) < 103


# ---------------------------------------------------------------------------------------- 4. chat data
def test_messages_rows_train_and_generate_with_the_same_prompt_text(work, tmp_path):
    out = tmp_path / "chat"
    assert distill(work, out, teacher="chat_teacher", student="chat_student", train="chat.jsonl") == 0
    chat = char_tokenizer()
    chat.chat_template = TEMPLATE
    trained = DistillDataset(work / "chat.jsonl", chat).prompts
    assert trained[0] == "<system>reverse<user>abc<assistant>"
    assert main(["generate", "--model", str(out), "--data", str(work / "chat.jsonl"), "--out", str(tmp_path / "g"),
                 "--max-new-tokens", "3"]) == 0
    assert [json.loads(line)["prompt"] for line in (tmp_path / "g").read_text().splitlines()] == trained
    assert main(["generate", "--model", str(out), "--prompt", "xyz", "--out", str(tmp_path / "one"),
                 "--max-new-tokens", "3"]) == 0  # --prompt-format auto: as distilled, one user turn
    assert json.loads((tmp_path / "one").read_text())["prompt"] == "<user>xyz<assistant>"


def test_dolly_prompts_get_the_instruction_template_in_generate_too(work, tmp_path):
    (tmp_path / "dolly.jsonl").write_text(json.dumps({"instruction": "reverse abc", "response": "cba"}) + "\n")
    out = tmp_path / "dolly"
    assert distill(work, out, "--per-device-train-batch-size", "1", train=str(tmp_path / "dolly.jsonl")) == 0
    assert main(["generate", "--model", str(out), "--prompt", "reverse abc", "--out", str(tmp_path / "g"),
                 "--max-new-tokens", "2"]) == 0
    generated = json.loads((tmp_path / "g").read_text())["prompt"]
    assert generated == DistillDataset(tmp_path / "dolly.jsonl", char_tokenizer()).prompts[0]
    assert generated.startswith("### Instruction:\nreverse abc")


# ---------------------------------------------------------------------------------------------- 5. LoRA
def test_lora_run_saves_only_adapters_and_reloads(work, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "lora"
    assert distill(work, out, "--use-peft", "--lora-r", "4", "--learning-rate", "1e-2") == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(out))
    base = char_gpt2(1, 32, seed=2)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained from zero
    merged = model.merge_and_unload()
    original = base.state_dict()
    frozen = [n for n in original if "ln_" in n or "wpe" in n]  # no adapters there: bit-identical
    assert all(torch.equal(merged.state_dict()[n], original[n]) for n in frozen)
    assert main(["generate", "--model", str(out), "--prompt", "reverse abc:", "--max-new-tokens", "3"]) == 0


# ------------------------------------------------------------------------------------------ 7. bad input
@pytest.mark.parametrize("argv, flag", [
    (["generate", "--model", "{w}/student", "--prompt", ""], "--prompt is empty"),
    (["generate", "--model", "{w}/student", "--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0"),
    (["eval", "--model", "{w}/student", "--data", "{w}/train.jsonl", "--temperature", "-1"], "--temperature"),
    (["generate", "--model", "{w}/student", "--prompt", "x", "--out", "{t}/missing/out.jsonl"], "--out"),
    (["generate", "--model", "{w}/student", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["distill", "--max-steps", "0"], "--max-steps must be >= 1"),
    (["distill", "--gen-temperature", "-1"], "--gen-temperature must be >= 0"),
    (["distill", "--train", "{t}/latin1.jsonl"], "latin1.jsonl:2: not UTF-8"),
    (["distill", "--lmbda", "1.5"], "--lmbda must be in [0, 1]"),
    (["distill", "--resume", "latest"], "--resume latest: no complete checkpoint"),
])
def test_bad_input_gives_one_line_naming_the_flag_and_creates_no_files(work, tmp_path, capsys, argv, flag):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xe9", "response": "b"}\n')
    argv = [a.format(w=work, t=tmp_path) for a in argv]
    if argv[0] == "distill":
        argv = ["distill", "--teacher", str(work / "teacher"), "--student", str(work / "student"), "--train",
                str(work / "train.jsonl"), "--output-dir", str(tmp_path / "out"), "--use-cpu", *argv[1:]]
    before = files_under(tmp_path)
    assert main(argv) == 2
    one_line_error(capsys, flag)
    assert files_under(tmp_path) == before


# ------------------------------------------------------------------------------------------ 8. scores
def test_the_scores_file_is_strict_json_with_units_and_settings(work, tmp_path):
    out = tmp_path / "scores.json"
    assert main(["eval", "--model", str(work / "student"), "--data", str(work / "train.jsonl"), "--out", str(out),
                 "--max-new-tokens", "4", "--seed", "5"]) == 0

    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    report = json.loads(out.read_text(), parse_constant=refuse)
    assert report["by_length"]["128+"] == {"n": 0, "rougeL": None, "exact_match": None}
    assert "fraction" in report["units"]["rougeL"] and report["settings"]["seed"] == 5
    assert report["settings"]["max_new_tokens"] == 4 and report["settings"]["model"] == str(work / "student")


# --------------------------------------------------------------------------------------- 9. TRL's names
def tiny_trainer(tmp_path, teacher=None, student=None, peft_config=None, **overrides):
    settings = {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
                "learning_rate": 3e-3, "logging_steps": 1, "save_strategy": "no", "report_to": [], "seed": 3,
                "use_cpu": True, "max_new_tokens": 5, "disable_tqdm": True}
    tok = char_tokenizer()
    return SwitchKDTrainer(model=student if student is not None else char_gpt2(1, 32, seed=2),
                           teacher_model=teacher if teacher is not None else char_gpt2(2, 64, seed=1),
                           args=SwitchKDConfig(**{**settings, **overrides}), peft_config=peft_config,
                           train_dataset=DistillDataset(REVERSE_ROWS, tok, max_prompt_tokens=32, max_length=64),
                           processing_class=tok)


def test_models_as_paths_with_init_kwargs_like_trl(work, tmp_path):
    args = SwitchKDConfig(output_dir=str(tmp_path / "out"), max_steps=1, use_cpu=True, report_to=[],
                          model_init_kwargs='{"dtype": "float64"}', teacher_model_init_kwargs={"dtype": "bfloat16"})
    trainer = SwitchKDTrainer(model=str(work / "student"), teacher_model=str(work / "teacher"), args=args,
                              train_dataset=DistillDataset(REVERSE_ROWS, char_tokenizer()))
    assert trainer.model.dtype == torch.float64 and trainer.teacher.dtype == torch.bfloat16
    assert trainer.processing_class.get_vocab() == char_tokenizer().get_vocab()
    with pytest.raises(ValueError, match="tokenizers differ"):
        SwitchKDTrainer(model=str(work / "student"), teacher_model=str(work / "other_tokenizer"), args=args)
    with pytest.raises(TypeError, match="pass the teacher once"):
        SwitchKDTrainer(model=char_gpt2(1, 32, seed=2), teacher=char_gpt2(1, 32, seed=2),
                        teacher_model=char_gpt2(1, 32, seed=2), args=args)
    with pytest.raises(ValueError, match="model_init_kwargs is only used when model is a path"):
        SwitchKDTrainer(model=char_gpt2(1, 32, seed=2), teacher_model=str(work / "teacher"), args=args)


@pytest.mark.parametrize("seq_kd, source, share", [(False, "dataset", None), (True, "teacher", 1.0)])
def test_lmbda_zero_takes_dataset_or_teacher_sequences(tmp_path, seq_kd, source, share):
    trainer = tiny_trainer(tmp_path, source="student", lmbda=0.0, seq_kd=seq_kd)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert len(logs) == 2 and all(h["from_dataset"] == float(source == "dataset") for h in logs)
    assert all(h.get("teacher_share") == share for h in logs)


def test_lmbda_mixes_generated_and_dataset_steps(tmp_path):
    trainer = tiny_trainer(tmp_path, source="student", lmbda=0.5, max_steps=12)
    trainer.train()
    from_dataset = [h["from_dataset"] for h in trainer.state.log_history if "from_dataset" in h]
    assert len(from_dataset) == 12 and 0 < sum(from_dataset) < 12


def test_peft_config_trains_only_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    trainer = tiny_trainer(tmp_path, peft_config=peft.LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    trainer.train()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_text_rows_are_tokenised_like_a_trl_dataset(tmp_path):
    chat = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in REVERSE_ROWS]
    tok = char_tokenizer()
    trainer = SwitchKDTrainer(model=char_gpt2(1, 32, seed=2), teacher_model=char_gpt2(2, 64, seed=1),
                              args=SwitchKDConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                              train_dataset=chat, eval_dataset=REVERSE_ROWS, processing_class=tok)
    assert isinstance(trainer.train_dataset, DistillDataset) and trainer.train_dataset.prompt_format == "chat"
    assert trainer.eval_dataset.prompts[0] == REVERSE_ROWS[0]["prompt"]

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from switchkd import SwitchKDConfig, SwitchKDTrainer, kd_loss
from switchkd.training.data import DistillDataset
from switchkd.training.losses import sequence_kd_loss, sequence_linear_kd_loss

from models import REVERSE_ROWS, char_gpt2, char_tokenizer


@pytest.fixture(autouse=True)
def _reference(reference_backend):
    """Model-level tests run the reference ops; the kernels have their own tests (the interpreter is slow)."""


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def make_trainer(tmp_path, tokenizer, steps=12, **overrides):
    settings = {"output_dir": str(tmp_path / "out"), "max_steps": steps, "per_device_train_batch_size": 4,
                "learning_rate": 3e-3, "logging_steps": 1, "save_strategy": "no", "report_to": [], "seed": 3,
                "use_cpu": True, "max_new_tokens": 8, "tau0": 0.3, "decay": 0.05, "disable_tqdm": True}
    args = SwitchKDConfig(**{**settings, **overrides})
    dataset = DistillDataset(REVERSE_ROWS, tokenizer, max_prompt_tokens=32, max_length=64)
    return SwitchKDTrainer(model=char_gpt2(1, 32, seed=2), teacher=char_gpt2(2, 64, seed=1), args=args,
                           train_dataset=dataset, processing_class=tokenizer)


def kd_losses(trainer):
    return [h["kd_loss"] for h in trainer.state.log_history if "kd_loss" in h]


@pytest.mark.parametrize("source", ["switch", "student", "teacher", "dataset", "adaptive"])
def test_each_source_trains(tmp_path, tokenizer, source):
    trainer = make_trainer(tmp_path, tokenizer, source=source, adaptive_warmup_ratio=0.1)
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    trainer.train()
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in trainer.teacher.state_dict().items())
    assert trainer.model.training and trainer.model.config._attn_implementation != "switchkd_paged"
    losses = kd_losses(trainer)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    if source in ("switch", "student", "teacher"):
        shares = [h["teacher_share"] for h in trainer.state.log_history if "teacher_share" in h]
        expected = {"student": 0.0, "teacher": 1.0}
        assert all(s == expected[source] for s in shares) if source in expected else 0.0 <= min(shares) <= 1.0


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "skl", "srkl", "tvd"])
def test_each_loss_kind_trains(tmp_path, tokenizer, kind):
    trainer = make_trainer(tmp_path, tokenizer, source="dataset", loss_kind=kind)
    trainer.train()
    losses = kd_losses(trainer)
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_fused_linear_loss_gives_the_same_training(tmp_path, tokenizer):
    runs = []
    for fused in (False, True):
        trainer = make_trainer(tmp_path / str(fused), tokenizer, steps=4, source="switch", fused_linear_loss=fused)
        trainer.train()
        runs.append((kd_losses(trainer), final_weights(trainer)))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-4)
    for name, value in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], value, rtol=1e-4, atol=1e-6)


def test_cross_entropy_on_dataset_responses_is_added(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, source="dataset", ce_weight=1.0)
    trainer.train()
    totals = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert totals[0] > kd_losses(trainer)[0] + 1.0  # CE of a random student is ~ln(103)
    assert sum(totals[-3:]) < sum(totals[:3])


def final_weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_resume_ends_with_the_same_weights(tmp_path, tokenizer):
    common = {"source": "adaptive", "adaptive_warmup_ratio": 0.1, "adaptive_max_prob": 0.9, "replay_ratio": 0.5}
    straight = make_trainer(tmp_path / "a", tokenizer, steps=8, **common)
    straight.train()
    first = make_trainer(tmp_path / "b", tokenizer, steps=8, save_strategy="steps", save_steps=4, **common)
    first.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-4"
    assert (checkpoint / "switchkd_state_rank0.pt").is_file()
    resumed = make_trainer(tmp_path / "b", tokenizer, steps=8, **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert len(resumed.replay) == len(straight.replay) > 0
    for name, value in final_weights(straight).items():
        torch.testing.assert_close(final_weights(resumed)[name], value, rtol=1e-5, atol=1e-6)


def test_two_process_ddp_equals_one_process(tmp_path):
    script = Path(__file__).with_name("ddp_train.py")
    env = {**os.environ, "SWITCHKD_BACKEND": "reference", "OMP_NUM_THREADS": "1"}
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               str(script), str(out), str(4 // procs)]  # --standalone: rendezvous on a free local port
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[procs] = torch.load(out / "weights.pt")
        assert json.loads((out / "log.json").read_text())["steps"] == 6
    for name, value in runs[1].items():
        torch.testing.assert_close(runs[2][name], value, rtol=1e-4, atol=1e-6)


def test_training_step_generates_then_computes_the_loss_on_packed_sequences(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, source="switch", tau0=0.0, decay=0.0)  # every token switches
    seen = []
    compute_loss = trainer.compute_loss
    trainer.compute_loss = lambda model, inputs, **kw: seen.append(inputs) or compute_loss(model, inputs, **kw)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop otherwise
    loss = trainer.training_step(trainer.model, batch)
    assert torch.isfinite(loss) and len(seen) == 1
    inputs = seen[0]
    assert not inputs["from_dataset"] and trainer._metrics["teacher_share"] == [1.0]
    for row, prompt in enumerate(batch["prompt_ids"]):
        ids, labels = inputs["input_ids"][row].tolist(), inputs["labels"][row].tolist()
        assert ids[: len(prompt)] == prompt and all(label == -100 for label in labels[: len(prompt)])
        response = [t for t in labels if t != -100]
        assert 1 <= len(response) <= 8 and ids[len(prompt): len(prompt) + len(response)] == response


@pytest.mark.parametrize("fused", [False, True])
def test_reused_teacher_states_replace_the_teacher_forward(tmp_path, tokenizer, fused):
    """Generated responses bring the teacher's hidden states from decoding: the loss equals the one from a teacher
    forward, and after a one-time check the loss makes no teacher forward of its own."""
    trainer = make_trainer(tmp_path, tokenizer, source="switch", fused_linear_loss=fused)
    seen, full_forwards = [], []
    compute_loss = trainer.compute_loss
    trainer.compute_loss = lambda model, inputs, **kw: seen.append(inputs) or compute_loss(model, inputs, **kw)
    trainer.teacher.register_forward_pre_hook(  # decoding's forwards carry the paged-attention metadata
        lambda module, args, kwargs: full_forwards.append(not any(k.startswith("switchkd") for k in kwargs)),
        with_kwargs=True)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    for start in (0, 3):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(start, start + 3)])
        full_forwards.clear()
        trainer.training_step(trainer.model, batch)
    assert sum(full_forwards) == 0, "the second step's loss ran the teacher"
    inputs = seen[-1]
    assert inputs["teacher_hidden"].shape[:2] == inputs["labels"][:, 1:].shape
    with torch.no_grad():
        reused = compute_loss(trainer.model, inputs)
        forward = compute_loss(trainer.model, {k: v for k, v in inputs.items() if k != "teacher_hidden"})
    torch.testing.assert_close(reused, forward, rtol=1e-5, atol=1e-6)


def test_no_reuse_when_switched_off(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, source="switch", reuse_teacher_states=False)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    with torch.no_grad():
        assert trainer._responses(trainer.model, batch)[3] is None


def test_sequence_losses_are_per_sequence_token_means(reference_backend):
    hidden_s, hidden_t = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, 5, 16, dtype=torch.float64)
    head_s, head_t = torch.randn(11, 8, dtype=torch.float64), torch.randn(11, 16, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :4] = -100
    labels[2, 1] = -100
    logits_s, logits_t = hidden_s @ head_s.T, hidden_t @ head_t.T
    expected = torch.stack([kd_loss(logits_s[b], logits_t[b], labels[b], kind="jsd") for b in range(3)]).mean()
    torch.testing.assert_close(sequence_kd_loss(logits_s, logits_t, labels, kind="jsd"), expected)
    fused = sequence_linear_kd_loss(hidden_s, head_s, hidden_t, head_t, labels, kind="jsd")
    torch.testing.assert_close(fused, expected)

"""train section of the throughput benchmark: one optimizer step of SFT, supervised KD, GKD (student source)
and SWITCH on the same prompts, timed piece by piece.

Pieces: ``generation`` (``SwitchGenerator`` under ``no_grad``: policy ``never`` for GKD, as the trainer's
``student`` source does, and an ``exp`` policy calibrated so that about half of the tokens switch for
SWITCH), ``teacher_forward`` (``no_grad``; for generated responses the teacher's LM head of the hidden states
decoding kept, as the trainer's ``reuse_teacher_states`` does, else a teacher forward), ``student_forward_loss``
and ``backward_optimizer`` (backward, AdamW step, zero_grad). SFT and KD train on the data's responses (random
tokens of the same length), so every method trains the same number of tokens. The loss is what the trainer
computes on each device: ``kd_loss`` on logits on CPU, ``fused_linear_kd_loss`` on the last hidden states on
CUDA. The pieces are measured directly (no Trainer); each figure is the median of ``reps`` steps after one
warm-up step.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

import switchkd
from switchkd.training.data import teacher_hidden_at_labels

from decode import PAIRS, build, calibrated_policy

METHODS = ("sft", "kd", "gkd", "switch")
PIECES = ("generation", "teacher_forward", "student_forward_loss", "backward_optimizer")
# llama-1b/160m scaled down for CPUs: the same layer ratio (16:12 -> 4:3) and width ratio (2048:768 -> 256:96).
PAIRS = {**PAIRS, "llama-tiny": ({"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 1024,
                                  "num_attention_heads": 4, "num_key_value_heads": 2},
                                 {"num_hidden_layers": 3, "hidden_size": 96, "intermediate_size": 384,
                                  "num_attention_heads": 4, "num_key_value_heads": 2}, "llama")}


@dataclass(frozen=True)
class TrainSize:
    pair: str
    batch: int
    prompt_len: int
    new_tokens: int
    vocab: int
    reps: int


CPU_TRAIN = TrainSize("llama-tiny", batch=8, prompt_len=16, new_tokens=64, vocab=4096, reps=4)
GPU_TRAIN = TrainSize("llama-1b/160m", batch=16, prompt_len=64, new_tokens=256, vocab=32000, reps=3)


class PieceTimer:
    """Wall time of named pieces of one step (synchronising the GPU around each)."""

    def __init__(self, device: str):
        self.device, self.seconds = device, dict.fromkeys(PIECES, 0.0)

    def __call__(self, piece: str, fn, *args, **kwargs):
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.seconds[piece] += time.perf_counter() - start
        return out


@dataclass
class Setup:
    """What every method's step shares: the models, the batch, the generator and the optimizer."""

    teacher: torch.nn.Module
    student: torch.nn.Module
    prompts: torch.Tensor  # [B, P]
    data_responses: torch.Tensor  # [B, N]
    policies: dict
    generator: switchkd.SwitchGenerator
    optimizer: torch.optim.Optimizer
    fused_linear: bool


def sequences(method: str, setup: Setup) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """``[B, P + N]`` prompt + response token ids, the generation's teacher share and forward counts, and the
    teacher's hidden states at the generated tokens (what the trainer reuses), or None for data responses."""
    if method in ("sft", "kd"):
        return torch.cat([setup.prompts, setup.data_responses], 1), {}, None
    out = setup.generator.generate(setup.prompts, policy=setup.policies[method],
                                   max_new_tokens=setup.data_responses.shape[1], return_teacher_hidden=True)
    return out.sequences.to(setup.prompts.device), {"teacher_share": out.teacher_share,
                                                    "student_forwards": out.student_forwards,
                                                    "teacher_forwards": out.teacher_forwards}, out.teacher_hidden


def logits_or_hidden(model, input_ids, fused_linear: bool) -> torch.Tensor:
    """The logits ``[B, T, V]``, or the last hidden states ``[B, T, H]`` for the fused linear loss."""
    if not fused_linear:
        return model(input_ids=input_ids).logits
    return model(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]


def teacher_side(setup: Setup, input_ids, labels, hidden) -> torch.Tensor:
    """The teacher's logits (or hidden states, fused) at the label positions: its LM head of the hidden states kept
    by decoding, as the trainer does for generated responses, else a teacher forward."""
    if hidden is None:
        return logits_or_hidden(setup.teacher, input_ids, setup.fused_linear)[:, :-1]
    aligned = teacher_hidden_at_labels(hidden, [hidden.shape[1]] * hidden.shape[0], labels)
    return aligned if setup.fused_linear else setup.teacher.get_output_embeddings()(aligned)


def student_loss(method: str, setup: Setup, input_ids, labels, teacher_out) -> torch.Tensor:
    """Cross-entropy (SFT) or the KD loss on the response tokens."""
    fused = setup.fused_linear and method != "sft"
    s_out = logits_or_hidden(setup.student, input_ids, fused)[:, :-1]
    if method == "sft":
        return torch.nn.functional.cross_entropy(s_out.flatten(0, 1).float(), labels.flatten())
    if fused:
        return switchkd.fused_linear_kd_loss(s_out, setup.student.get_output_embeddings().weight, teacher_out,
                                             setup.teacher.get_output_embeddings().weight, labels)
    return switchkd.kd_loss(s_out, teacher_out, labels)


def train_step(method: str, setup: Setup, device: str) -> tuple[dict, dict]:
    """One optimizer step of ``method``: (seconds per piece, generation statistics)."""
    timer = PieceTimer(device)
    input_ids, stats, hidden = timer("generation", torch.no_grad()(sequences), method, setup)
    labels = input_ids[:, 1:].clone()
    labels[:, : setup.prompts.shape[1] - 1] = -100
    teacher_out = None
    if method != "sft":
        teacher_out = timer("teacher_forward", torch.no_grad()(teacher_side), setup, input_ids, labels, hidden)
    loss = timer("student_forward_loss", student_loss, method, setup, input_ids, labels, teacher_out)

    def update():
        loss.backward()
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)

    timer("backward_optimizer", update)
    return timer.seconds, stats


def make_setup(size: TrainSize, dtype, device) -> Setup:
    teacher_kwargs, student_kwargs, family = PAIRS[size.pair]
    torch.manual_seed(0)
    teacher = build(teacher_kwargs, family, size.vocab, dtype, device)
    student = build(student_kwargs, family, size.vocab, dtype, device).train()
    prompts = torch.randint(0, size.vocab, (size.batch, size.prompt_len), device=device)
    data_responses = torch.randint(0, size.vocab, (size.batch, size.new_tokens), device=device)
    policies = {"gkd": switchkd.SwitchPolicy("never"),
                "switch": calibrated_policy(teacher, student, prompts, size.new_tokens, share=0.5)}
    return Setup(teacher, student, prompts, data_responses, policies,
                 switchkd.SwitchGenerator(teacher, student, block_size=16),
                 torch.optim.AdamW(student.parameters(), lr=1e-6), fused_linear=device == "cuda")


def run_train(size: TrainSize, dtype, device) -> list[dict]:
    """Per method: median step time and pieces; the methods take turns each rep, so load drift hits all alike."""
    setup = make_setup(size, dtype, device)
    for method in METHODS:
        train_step(method, setup, device)  # warm-up: pools, graphs, adaptive draft length, allocator
    steps = {method: [] for method in METHODS}
    for _ in range(size.reps):
        for method in METHODS:
            steps[method].append(train_step(method, setup, device))
    rows = []
    for method, runs in steps.items():
        seconds = statistics.median(sum(s.values()) for s, _ in runs)
        rows.append({"section": "train", "op": "train_step", "provider": method,
                     "shape": f"{size.pair} b{size.batch} p{size.prompt_len} n{size.new_tokens} v{size.vocab}",
                     "dtype": str(dtype).replace("torch.", ""), "mode": "step", "ms": 1e3 * seconds,
                     **{f"{p}_ms": 1e3 * statistics.median(s[p] for s, _ in runs) for p in PIECES},
                     "tokens_per_s": size.batch * size.new_tokens / seconds, **runs[-1][1],
                     "loss": "fused_linear_kd_loss" if setup.fused_linear else "kd_loss"})
    totals = {method: [sum(s.values()) for s, _ in runs] for method, runs in steps.items()}
    for row in rows:  # paired: each rep's step over the GKD step of the same rep
        row["vs_gkd"] = statistics.median(a / b for a, b in zip(totals[row["provider"]], totals["gkd"], strict=True))
    return rows


def print_breakdown(rows: list[dict]) -> None:
    columns = ["provider", "shape", "ms", *(f"{p}_ms" for p in PIECES), "tokens_per_s", "teacher_share",
               "student_forwards", "teacher_forwards", "vs_gkd"]
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    for line in [columns, *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)))


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) and abs(value) < 1000 else (
        f"{value:.0f}" if isinstance(value, float) else str(value))


def run(section, ctx):
    rows = run_train(GPU_TRAIN if ctx.full else CPU_TRAIN, ctx.dtype, ctx.device)
    print_breakdown(rows)
    return rows

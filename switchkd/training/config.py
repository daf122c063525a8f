"""SwitchKDConfig: ``TrainingArguments`` plus the distillation options; the one source of every option,
its default and its help (the CLI is generated from it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from ..ops.spec import DEFAULT_DECAY, DEFAULT_TAU0, DEFAULT_TOP_K, LOSS_KINDS, POLICY_KINDS, SwitchPolicy

SOURCES = ("switch", "student", "teacher", "dataset", "adaptive")


@dataclass
class SwitchKDConfig(TrainingArguments):
    """``TrainingArguments`` plus what a distillation step needs.

    ``source`` picks each step's sequences: ``switch`` (SWITCH decoding with ``policy``/``tau0``/
    ``decay``/``top_k``), ``student`` (GKD: the student's own samples), ``teacher`` (SeqKD),
    ``dataset`` (the data's responses; supervised KD), or ``adaptive`` (DistiLLM: student samples
    with a probability rising to ``adaptive_max_prob`` over the first ``adaptive_warmup_ratio`` of
    training, reused from a replay buffer of ``replay_size`` sequences with probability ``replay_ratio``).

    TRL ``GKDConfig`` names: ``lmbda`` (probability that a step uses the generated ``source`` rather than
    the dataset's responses, or the teacher's samples with ``seq_kd``), ``seq_kd``, ``model_init_kwargs``
    and ``teacher_model_init_kwargs`` (``from_pretrained`` kwargs when the models are given as paths/ids;
    a dict or its JSON text); GKD's ``beta`` is ``kd_beta`` with ``loss_kind="jsd"``, its ``temperature``
    ``gen_temperature`` (and ``kd_temperature``).
    """

    # TrainingArguments fields restated only to keep the CLI's earlier short flags as aliases.
    per_device_train_batch_size: int = field(default=8, metadata={
        "aliases": ["--batch-size"], "help": "sequences per device per step"})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "aliases": ["--grad-accum"], "help": "micro-batches accumulated per optimizer step"})
    use_cpu: bool = field(default=False, metadata={"aliases": ["--cpu"], "help": "train on the CPU even with a GPU"})

    source: Literal[SOURCES] = field(default="switch", metadata={"help": "where each step's sequences come from"})
    loss_kind: Literal[LOSS_KINDS] = field(default="srkl", metadata={"aliases": ["--loss"], "help": "KD loss kind"})
    kd_alpha: float = field(default=0.1, metadata={"aliases": ["--alpha"], "help": "skew of skl/srkl"})
    kd_beta: float = field(default=0.5, metadata={"aliases": ["--beta"], "help": "weight of jsd (0 = fkl, 1 = rkl)"})
    kd_temperature: float = field(default=1.0, metadata={"help": "temperature of the KD loss"})
    kd_weight: float = field(default=1.0, metadata={"help": "weight of the KD loss (0 with ce_weight > 0 = SFT)"})
    ce_weight: float = field(default=0.0, metadata={"help": "weight of cross-entropy on dataset responses"})
    policy: Literal[POLICY_KINDS] = field(default="exp", metadata={"help": "SwitchPolicy kind for source=switch"})
    tau0: float = field(default=DEFAULT_TAU0, metadata={
        "help": "initial JSD threshold in nats (JSD lies in [0, ln 2 = 0.693]): the teacher writes a token when the "
                "JSD exceeds it; lower it for more teacher tokens (logged: gen_divergence, teacher_share)"})
    decay: float = field(default=DEFAULT_DECAY, metadata={"help": "threshold decay per generated token"})
    top_k: int = field(default=DEFAULT_TOP_K, metadata={"help": "k of the topk (SKD) policy"})
    max_new_tokens: int = field(default=128, metadata={"help": "generated tokens per sequence"})
    gen_temperature: float = field(default=1.0, metadata={"aliases": ["--temperature"],
                                                          "help": "sampling temperature (0 = greedy)"})
    draft_len: int = field(default=4, metadata={"help": "most student tokens drafted per teacher forward"})
    block_size: int = field(default=16, metadata={"help": "KV-cache block size of the generator"})
    adaptive_max_prob: float = field(default=0.5, metadata={"help": "adaptive: final P(student samples)"})
    adaptive_warmup_ratio: float = field(default=0.5, metadata={"help": "adaptive: share of training to reach it"})
    replay_size: int = field(default=1000, metadata={"help": "adaptive: replay buffer capacity (sequences)"})
    replay_ratio: float = field(default=0.5, metadata={"help": "adaptive: P(reuse from the buffer)"})
    lmbda: float = field(default=1.0, metadata={
        "help": "probability that a step uses --source's sequences rather than the data's (or, with --seq-kd, "
                "the teacher's); TRL GKD's lmbda (GKD: --source student --lmbda 0.5)"})
    seq_kd: bool = field(default=False, metadata={
        "help": "steps not taken from --source use teacher-generated sequences instead of the data's (TRL GKD)"})
    model_init_kwargs: dict | str | None = field(default=None, metadata={
        "help": "from_pretrained kwargs of a student given as a path or id (JSON), e.g. '{\"dtype\": \"bfloat16\"}'"})
    teacher_model_init_kwargs: dict | str | None = field(default=None, metadata={
        "help": "from_pretrained kwargs of a teacher given as a path or id (JSON)"})
    warmup_ratio: float = field(default=0.0, metadata={
        "help": "share of the training steps of linear learning-rate warmup (sets warmup_steps)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "train in an output_dir that holds another run: its checkpoint-* folders are removed first"})
    logging_steps: float = field(default=10, metadata={
        "help": "log every N optimizer steps (a float in [0, 1): that share of the training)"})
    fused_linear_loss: bool | None = field(default=None, metadata={
        "help": "KD loss from last hidden states and LM heads (fused_linear_kd_loss), without full [N, V] logits; "
                "default: on CUDA when both LM heads are bias-free linear layers"})
    reuse_teacher_states: bool = field(default=True, metadata={
        "help": "generated responses: take the teacher's side of the loss from the hidden states decoding computed "
                "(its LM head of them) instead of a second teacher forward; needs a bias-free linear teacher head"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep the token lists (needed)"})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "every student weight is used"})

    def __post_init__(self):
        self.model_init_kwargs = _json_dict(self.model_init_kwargs, "model_init_kwargs")
        self.teacher_model_init_kwargs = _json_dict(self.teacher_model_init_kwargs, "teacher_model_init_kwargs")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be >= 1 (or -1: train num_train_epochs epochs), got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_ratio and "warmup_ratio" not in TrainingArguments.__dataclass_fields__:
            if self.warmup_steps:
                raise ValueError("set warmup_ratio or warmup_steps, not both")
            self.warmup_steps = self.warmup_ratio  # transformers 5.x reads a float warmup_steps in (0, 1) as a ratio
        super().__post_init__()
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.loss_kind not in LOSS_KINDS:
            raise ValueError(f"loss_kind must be one of {LOSS_KINDS}, got {self.loss_kind!r}")
        for name in ("adaptive_max_prob", "adaptive_warmup_ratio", "replay_ratio", "kd_alpha", "kd_beta", "lmbda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("max_new_tokens", "draft_len", "block_size", "replay_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gen_temperature", "kd_weight", "ce_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if self.source in ("adaptive", "dataset") and (self.lmbda != 1.0 or self.seq_kd):
            raise ValueError(f"lmbda and seq_kd mix generated and dataset steps; source={self.source!r} has its own "
                             "mix (use source switch, student or teacher)")
        self.switch_policy()  # validates policy/tau0/decay/top_k

    def switch_policy(self) -> SwitchPolicy:
        return SwitchPolicy(self.policy, tau0=self.tau0, decay=self.decay, top_k=self.top_k)


def _json_dict(value, name: str) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        parsed = None
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} must be a dict or its JSON text, got {value!r}")
    return parsed

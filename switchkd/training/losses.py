"""The training step's losses as pure functions of model outputs: testable without a Trainer.

Every loss is the mean over sequences of each sequence's mean over its response tokens, so a global
batch gives the same loss however it is split across processes.
"""

from __future__ import annotations

import torch

from ..ops.kd_loss import kd_loss
from ..ops.linear_kd import fused_linear_kd_loss


def response_tokens(shifted_labels: torch.Tensor) -> torch.Tensor:
    """``[B]`` response tokens per sequence (at least 1), from labels shifted to the next-token position."""
    return (shifted_labels != -100).sum(-1).clamp_min(1)


def sequence_kd_loss(student_logits, teacher_logits, shifted_labels, **loss_args) -> torch.Tensor:
    """KD loss from ``[B, T, V]`` logits already aligned with ``shifted_labels [B, T]``."""
    rows = kd_loss(student_logits, teacher_logits, shifted_labels, reduction="none", **loss_args)
    return (rows.sum(-1) / response_tokens(shifted_labels)).mean()


def sequence_linear_kd_loss(student_hidden, student_head, teacher_hidden, teacher_head, shifted_labels,
                            **loss_args) -> torch.Tensor:
    """The same loss from last hidden states ``[B, T, H]`` and LM-head weights, without ``[B, T, V]`` logits."""
    batch, length = shifted_labels.shape
    weights = (1.0 / (response_tokens(shifted_labels) * batch))[:, None].expand(batch, length)
    return fused_linear_kd_loss(student_hidden, student_head, teacher_hidden, teacher_head, shifted_labels,
                                reduction="sum", row_weights=weights, **loss_args)


def sequence_cross_entropy(student_logits, shifted_labels) -> torch.Tensor:
    """Cross-entropy on the response tokens, averaged per sequence then over sequences."""
    ce = torch.nn.functional.cross_entropy(student_logits.transpose(1, 2).float(), shifted_labels, reduction="none")
    return (ce.sum(-1) / response_tokens(shifted_labels)).mean()


def plain_lm_head(model) -> torch.nn.Linear | None:
    """The model's LM head when it is a bias-free ``nn.Linear`` fed by the last hidden state, else None."""
    head = model.get_output_embeddings()
    return head if isinstance(head, torch.nn.Linear) and head.bias is None else None

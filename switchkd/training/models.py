"""Models and tokenizers for the trainer and the CLI: objects or paths/ids with init kwargs, LoRA through
``peft`` (optional), and the shared-tokenizer check (vocabularies compared as token -> id maps)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..decoding.generator import output_vocab_size

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def _init_kwargs(kwargs: dict | None) -> dict:
    """``from_pretrained`` kwargs with dtype names ("bfloat16") turned into ``torch`` dtypes ("auto" kept)."""
    kwargs = dict(kwargs or {})
    for key in ("dtype", "torch_dtype"):
        value = kwargs.get(key)
        if isinstance(value, str) and value != "auto":
            if not isinstance(getattr(torch, value, None), torch.dtype):
                raise ValueError(f"{key} must be 'auto' or a torch dtype name such as 'bfloat16', got {value!r}")
            kwargs[key] = getattr(torch, value)
    return kwargs


def load_model(model, init_kwargs: dict | None = None, *, name: str = "model"):
    """``model`` itself when it is a module, else ``AutoModelForCausalLM.from_pretrained(model, **init_kwargs)``
    (a folder holding a LoRA adapter loads its base model with the adapter). ``name`` is the argument's name."""
    if not isinstance(model, (str, os.PathLike)):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{name} must be a model, a path or a model id, got {type(model).__name__}")
        if init_kwargs:
            raise ValueError(f"{name}_init_kwargs is only used when {name} is a path or a model id")
        return model
    path = Path(model)
    if path.exists() and not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{name} directory {str(model)!r} has no config.json (a saved Hugging Face model is needed)")
    if (path / ADAPTER_CONFIG).is_file():
        return _peft().AutoPeftModelForCausalLM.from_pretrained(str(path), **_init_kwargs(init_kwargs))
    from transformers import AutoModelForCausalLM

    where = str(path.resolve()) if path.exists() else str(model)  # absolute: a LoRA adapter records its base
    return AutoModelForCausalLM.from_pretrained(where, **_init_kwargs(init_kwargs))


def load_tokenizer(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA (peft_config / --use-peft, or an adapter folder) needs the peft package: "
                          "pip install peft") from None
    return peft


def apply_peft(model, peft_config):
    """``model`` wrapped by ``peft.get_peft_model``: only the adapter weights train and get saved."""
    return _peft().get_peft_model(model, peft_config)


def lora_config(r: int, alpha: int, dropout: float, target_modules: list[str] | None):
    """A causal-LM ``peft.LoraConfig`` (``target_modules=None``: every linear layer but the LM head)."""
    return _peft().LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                              target_modules=target_modules or "all-linear")


def base_model(model):
    """The transformers model under a ``peft`` wrapper (adapters injected), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_vocabularies(teacher_tokenizer, student_tokenizer) -> None:
    """Teacher and student must share the tokenizer: the same token -> id map (sizes alone prove nothing)."""
    teacher, student = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher == student:
        return
    differing = sorted(t for t in set(teacher) | set(student) if teacher.get(t) != student.get(t))
    token = differing[0]
    raise ValueError(f"teacher and student tokenizers differ ({len(teacher)} vs {len(student)} tokens, "
                     f"{len(differing)} token ids differ, e.g. {token!r}: {teacher.get(token)} vs "
                     f"{student.get(token)}): they must share one tokenizer")


def check_output_rows(model, vocab: int | None, name: str) -> int:
    """The model's output rows; at least the tokenizer's ``vocab`` (padded embeddings are allowed)."""
    rows = output_vocab_size(base_model(model))
    if vocab is not None and rows < vocab:
        raise ValueError(f"the {name} has {rows} output rows, fewer than the tokenizer's {vocab} tokens: "
                         "it was not trained with this tokenizer")
    return rows

"""Instruction data for distillation: JSONL rows → token ids, and the batch collator."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
PROMPT_FORMATS = ("raw", "instruction", "chat")  # {prompt} rows, Dolly rows, {messages} rows
PROMPT_FORMAT_FILE = "switchkd_prompt.json"  # saved beside a distilled model: the format it was trained on


class Example(NamedTuple):
    """One row: ``prompt`` is text, or the chat turns before the last assistant turn (``format="chat"``)."""

    prompt: str | list[dict]
    response: str
    format: str = "raw"


def read_jsonl(path) -> list[Example]:
    """Examples from ``{"prompt", "response"}``, Dolly's ``{"instruction", "context", "response"}`` (the
    instruction template) or chat ``{"messages": [{"role", "content"}, ...]}`` rows (the prompt is every turn
    before the last, assistant, turn). A malformed row or a line that is not UTF-8 raises ``ValueError``
    naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    examples = []
    with path.open("rb") as lines:
        for lineno, raw in enumerate(lines, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1})") \
                    from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            examples.append(parse_row(row, where))
    return examples


def parse_row(row, where: str = "row") -> Example:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return _chat_example(row["messages"], where)
    if "prompt" in row:
        prompt, kind = row["prompt"], "raw"
    elif "instruction" in row:
        context = row.get("context") or ""
        if not isinstance(context, str):
            raise ValueError(f"{where}: 'context' must be a string")
        prompt, kind = instruction_prompt(row["instruction"], context), "instruction"
    else:
        raise ValueError(f"{where}: a row needs 'prompt', 'instruction' or 'messages' (and 'response'); "
                         f"keys: {sorted(row)}")
    response = row.get("response")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: the prompt must be a non-empty string")
    if not isinstance(response, str):
        raise ValueError(f"{where}: 'response' must be a string")
    return Example(prompt, response, kind)


def instruction_prompt(instruction, context: str = "") -> str:
    """Dolly's instruction template (with an ``### Input`` section when there is a context)."""
    if not isinstance(instruction, str) or not instruction:
        raise ValueError("the instruction must be a non-empty string")
    template = PROMPT_WITH_INPUT_TEMPLATE if context.strip() else PROMPT_TEMPLATE
    return template.format(instruction=instruction, context=context)


def _chat_example(messages, where: str) -> Example:
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise ValueError(f"{where}: 'messages' must be a list of {{\"role\": str, \"content\": str}} turns")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: 'messages' needs at least one turn before a last, assistant, turn")
    return Example([dict(m) for m in messages[:-1]], messages[-1]["content"], "chat")


def as_example(prompt: str, prompt_format: str) -> Example:
    """A bare prompt (``switchkd generate --prompt``) as a row of ``prompt_format``: the text as is, as Dolly's
    instruction, or as one user turn."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if prompt_format == "instruction":
        return Example(instruction_prompt(prompt), "", "instruction")
    if prompt_format == "chat":
        return Example([{"role": "user", "content": prompt}], "", "chat")
    return Example(prompt, "", "raw")


def prompt_text(prompt, tokenizer) -> str:
    """The text a model sees for a prompt: chat turns through the tokenizer's chat template (with the assistant
    generation prompt) when it has one, else as ``role: content`` lines; text as is. Training, ``generate``
    and ``eval`` all go through here."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "


def data_format(examples) -> str:
    """The prompt format of a data set (what ``generate --prompt`` should use after training on it)."""
    kinds = {e.format for e in examples}
    return kinds.pop() if len(kinds) == 1 else "raw"


def save_prompt_format(model_dir, prompt_format: str) -> None:
    Path(model_dir, PROMPT_FORMAT_FILE).write_text(json.dumps({"prompt_format": prompt_format}) + "\n")


def saved_prompt_format(model_dir) -> str:
    """The prompt format a model directory was distilled with ("raw" when it was not recorded)."""
    try:
        value = json.loads(Path(model_dir, PROMPT_FORMAT_FILE).read_text())["prompt_format"]
    except (OSError, ValueError, KeyError, TypeError):
        return "raw"
    return value if value in PROMPT_FORMATS else "raw"


class DistillDataset(torch.utils.data.Dataset):
    """Tokenised examples from a JSONL path, :class:`Example` rows, dict rows as in the JSONL (so a
    ``datasets.Dataset`` with a ``messages`` column works) or ``(prompt, response)`` pairs (a prompt being text
    or chat turns); rows too long for the limits are dropped and counted.

    Items: ``{"prompt_ids": [...], "response_ids": [...] (EOS appended), "index": i}``; ``prompts`` holds the
    prompt texts the model sees (:func:`prompt_text`), ``prompt_format`` the data's format.
    """

    def __init__(self, source, tokenizer, *, max_prompt_tokens: int = 256, max_length: int = 512,
                 add_eos: bool = True):
        pairs = read_jsonl(source) if isinstance(source, (str, Path)) else [_example(e) for e in source]
        eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
        self.prompt_format = data_format(pairs)
        self.items, self.references, self.prompts, self.dropped = [], [], [], 0
        for prompt, response, _ in pairs:
            text = prompt_text(prompt, tokenizer)
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
            too_long = len(prompt_ids) > max_prompt_tokens or len(prompt_ids) + len(response_ids) > max_length
            if not prompt_ids or too_long:
                self.dropped += 1
                continue
            self.items.append({"prompt_ids": prompt_ids, "response_ids": response_ids, "index": len(self.items)})
            self.references.append(response)
            self.prompts.append(text)
        if self.dropped:
            logger.warning("dropped %d of %d rows longer than max_prompt_tokens=%d / max_length=%d", self.dropped,
                           len(pairs), max_prompt_tokens, max_length)
        if not self.items:
            raise ValueError(f"no usable rows: all {len(pairs)} rows are empty or past the length limits")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _example(row) -> Example:
    if isinstance(row, Example):
        return row
    if isinstance(row, dict):  # a JSONL-style row, e.g. from a `datasets.Dataset`
        return parse_row(row)
    prompt, response = row
    return Example(prompt, response, "chat" if isinstance(prompt, list) else "raw")


def as_distill_dataset(data, tokenizer, name: str = "train_dataset"):
    """``data`` when its items are already tokenised (``prompt_ids``), else ``DistillDataset(data, tokenizer)``."""
    if data is None or isinstance(data, (DistillDataset, torch.utils.data.IterableDataset)):
        return data
    first = data[0] if len(data) else None
    if isinstance(first, dict) and "prompt_ids" in first:
        return data
    if tokenizer is None:
        raise ValueError(f"{name} holds text rows: pass processing_class (the tokenizer) to tokenise them")
    return DistillDataset(data, tokenizer)


class DistillCollator:
    """Keeps the token lists (the trainer builds its own batches) and the example indices."""

    def __call__(self, features):
        return {
            "prompt_ids": [f["prompt_ids"] for f in features],
            "response_ids": [f["response_ids"] for f in features],
            "index": torch.tensor([f["index"] for f in features]),
        }


def pad_sequences(prompts, responses, pad_token_id: int, device):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (response tokens only) for
    ``prompt + response`` rows."""
    rows = [p + r for p, r in zip(prompts, responses, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(p) + len(r)] = 1
    return input_ids.to(device), mask.to(device), labels.to(device)


def pack_batch(prompts, responses, pad_token_id: int, device) -> dict:
    """``input_ids``, ``attention_mask`` and ``labels`` of ``prompt + response`` rows; an empty response
    becomes one pad token (nothing to learn from it, but the shapes stay valid)."""
    responses = [r or [pad_token_id] for r in responses]
    input_ids, attention_mask, labels = pad_sequences(prompts, responses, pad_token_id, device)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def teacher_hidden_at_labels(hidden: torch.Tensor, lengths: list[int], shifted_labels: torch.Tensor) -> torch.Tensor:
    """``[B, T - 1, H]`` teacher hidden states aligned with ``shifted_labels`` (position ``i`` predicts token
    ``i + 1``): row ``b``'s ``lengths[b]`` generated states ``hidden [B, N, H]`` go to its response positions in
    order, zeros elsewhere (those positions are out of the loss)."""
    kept = shifted_labels != -100
    lengths = torch.tensor(lengths, device=hidden.device)
    generated = torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]
    if not torch.equal(kept.sum(1).cpu(), generated.sum(1).cpu()):
        raise ValueError("teacher_hidden: every response position needs one generated hidden state")
    out = hidden.new_zeros(*shifted_labels.shape, hidden.shape[-1])
    out[kept] = hidden[generated]
    return out

"""Instruction data for distillation: JSONL rows → token ids, and the batch collator."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"


def read_jsonl(path) -> list[tuple[str, str]]:
    """(prompt, response) pairs from ``{"prompt", "response"}`` or Dolly's ``{"instruction", "context",
    "response"}`` rows (Dolly rows get the instruction template). A malformed row raises ``ValueError``
    naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    pairs = []
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            pairs.append(_pair(row, f"{path}:{lineno}"))
    return pairs


def _pair(row, where: str) -> tuple[str, str]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "prompt" in row:
        prompt = row["prompt"]
    elif "instruction" in row:
        context = row.get("context") or ""
        if not isinstance(context, str):
            raise ValueError(f"{where}: 'context' must be a string")
        template = PROMPT_WITH_INPUT_TEMPLATE if context.strip() else PROMPT_TEMPLATE
        prompt = template.format(instruction=row["instruction"], context=context)
    else:
        raise ValueError(f"{where}: a row needs 'prompt' or 'instruction' (and 'response'); keys: {sorted(row)}")
    response = row.get("response")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: the prompt must be a non-empty string")
    if not isinstance(response, str):
        raise ValueError(f"{where}: 'response' must be a string")
    return prompt, response


class DistillDataset(torch.utils.data.Dataset):
    """Tokenised (prompt, response) pairs; rows too long for the limits are dropped and counted.

    Items: ``{"prompt_ids": [...], "response_ids": [...] (EOS appended), "index": i}``.
    """

    def __init__(self, source, tokenizer, *, max_prompt_tokens: int = 256, max_length: int = 512,
                 add_eos: bool = True):
        pairs = read_jsonl(source) if isinstance(source, (str, Path)) else list(source)
        eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
        self.items, self.references, self.dropped = [], [], 0
        for prompt, response in pairs:
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
            too_long = len(prompt_ids) > max_prompt_tokens or len(prompt_ids) + len(response_ids) > max_length
            if not prompt_ids or too_long:
                self.dropped += 1
                continue
            self.items.append({"prompt_ids": prompt_ids, "response_ids": response_ids, "index": len(self.items)})
            self.references.append(response)
        if self.dropped:
            logger.warning("dropped %d of %d rows longer than max_prompt_tokens=%d / max_length=%d", self.dropped,
                           len(pairs), max_prompt_tokens, max_length)
        if not self.items:
            raise ValueError(f"no usable rows: all {len(pairs)} rows are empty or past the length limits")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


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

"""Score a model's responses: ROUGE-L F (rouge-score, stemmed, max over references) and exact match,
overall and by reference length."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..decoding.generator import output_vocab_size
from .models import base_model

DEFAULT_BUCKETS = (16, 64, 128)  # reference-length (tokens) bucket edges
UNITS = {"rougeL": "fraction in [0, 1] (ROUGE-L F-measure, stemmed; the table shows percent)",
         "exact_match": "fraction in [0, 1] (the table shows percent)", "n": "examples",
         "by_length": "reference length in tokens of the model's tokenizer",
         "null": "no example in that bucket"}


@functools.cache
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F-measure with stemming, the best over ``references``."""
    scorer = _rouge_l_scorer()
    return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 128,
                       temperature: float = 0.0, batch_size: int = 8, seed: int = 0, progress: bool = True):
    """Token ids each prompt's response (EOS stripped), with ``model.generate`` on left-padded batches; output rows
    past the tokenizer's length (padded embeddings) are never sampled."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(not p for p in prompts):
        raise ValueError("prompt is empty: every prompt needs at least one token")
    torch.manual_seed(seed)
    rows = output_vocab_size(base_model(model))
    padded = {"suppress_tokens": list(range(len(tokenizer), rows))} if rows > len(tokenizer) else {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, **sampling, **padded)
        for row in out[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            responses.append(row)
    model.train(was_training)
    return responses


def length_bucket(length: int, edges=DEFAULT_BUCKETS) -> str:
    """The name of the reference-length bucket of ``length`` tokens, e.g. ``"16-63"`` or ``"128+"``."""
    low = 0
    for edge in edges:
        if length < edge:
            return f"{low}-{edge - 1}"
        low = edge
    return f"{low}+"


def bucket_names(edges=DEFAULT_BUCKETS) -> list[str]:
    """Every bucket's name, shortest first."""
    return [length_bucket(edge - 1, edges) for edge in edges] + [length_bucket(edges[-1], edges)]


def score(predictions: list[str], references: list[list[str]], reference_lengths: list[int],
          buckets=DEFAULT_BUCKETS) -> dict:
    """Mean ROUGE-L F and exact match (fractions) overall and per reference-length bucket; None when empty."""
    rows = [(rouge_l(p, refs), float(any(p.strip() == r.strip() for r in refs)), length_bucket(n, buckets))
            for p, refs, n in zip(predictions, references, reference_lengths, strict=True)]

    def summary(selected):
        n = len(selected)
        return {"n": n, "rougeL": sum(r for r, _, _ in selected) / n if n else None,
                "exact_match": sum(e for _, e, _ in selected) / n if n else None}

    names = bucket_names(buckets)
    return {"overall": summary(rows), "by_length": {b: summary([r for r in rows if r[2] == b]) for b in names}}


def evaluate(model, tokenizer, dataset, *, max_new_tokens: int = 128, temperature: float = 0.0, batch_size: int = 8,
             buckets=DEFAULT_BUCKETS, seed: int = 0, progress: bool = True) -> dict:
    """Generate for every example of a :class:`~switchkd.training.data.DistillDataset`; score against its responses."""
    prompts = [item["prompt_ids"] for item in dataset.items]
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                   batch_size=batch_size, seed=seed, progress=progress)
    predictions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in dataset.references]
    report = score(predictions, [[r] for r in dataset.references], lengths, buckets)
    report["units"] = UNITS
    report["predictions"] = predictions
    return report


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(report: dict) -> str:
    """Overall and per-bucket scores in percent (empty buckets as "-")."""
    lines = [f"{'bucket (ref tokens)':<20} {'n':>5} {'ROUGE-L %':>10} {'exact %':>8}"]
    for name, row in [("overall", report["overall"]), *report["by_length"].items()]:
        lines.append(f"{name:<20} {row['n']:>5} {_percent(row['rougeL']):>10} {_percent(row['exact_match']):>8}")
    return "\n".join(lines)


def _strict(value):
    """JSON-safe: NaN and infinities become null (strict parsers reject them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_report(report: dict, path) -> None:
    """Strict JSON (``allow_nan=False``: non-finite numbers are written as null)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_strict(report), indent=1, allow_nan=False) + "\n")

"""Score a model's responses: ROUGE-L F (rouge-score, stemmed, max over references) and exact match,
overall and by reference length."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

DEFAULT_BUCKETS = (16, 64, 128)  # reference-length (tokens) bucket edges


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
    """Token ids each prompt's response (EOS stripped), with ``model.generate`` on left-padded batches."""
    torch.manual_seed(seed)
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
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, **sampling)
        for row in out[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            responses.append(row)
    model.train(was_training)
    return responses


def _bucket(length: int, edges) -> str:
    low = 0
    for edge in edges:
        if length < edge:
            return f"{low}-{edge - 1}"
        low = edge
    return f"{low}+"


def score(predictions: list[str], references: list[list[str]], reference_lengths: list[int],
          buckets=DEFAULT_BUCKETS) -> dict:
    """Mean ROUGE-L F and exact match overall and per reference-length bucket."""
    rows = [(rouge_l(p, refs), float(any(p.strip() == r.strip() for r in refs)), _bucket(n, buckets))
            for p, refs, n in zip(predictions, references, reference_lengths, strict=True)]

    def summary(selected):
        n = len(selected)
        return {"n": n, "rougeL": sum(r for r, _, _ in selected) / n if n else float("nan"),
                "exact_match": sum(e for _, e, _ in selected) / n if n else float("nan")}

    names = [_bucket(edge - 1, buckets) for edge in buckets] + [_bucket(buckets[-1], buckets)]
    return {"overall": summary(rows), "by_length": {b: summary([r for r in rows if r[2] == b]) for b in names}}


def evaluate(model, tokenizer, dataset, *, max_new_tokens: int = 128, temperature: float = 0.0, batch_size: int = 8,
             buckets=DEFAULT_BUCKETS, progress: bool = True) -> dict:
    """Generate for every example of a :class:`switchkd.data.DistillDataset` and score against its responses."""
    prompts = [item["prompt_ids"] for item in dataset.items]
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                   batch_size=batch_size, progress=progress)
    predictions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in dataset.references]
    report = score(predictions, [[r] for r in dataset.references], lengths, buckets)
    report["predictions"] = predictions
    return report


def format_table(report: dict) -> str:
    lines = [f"{'bucket (ref tokens)':<20} {'n':>5} {'ROUGE-L':>8} {'exact':>7}"]
    for name, row in [("overall", report["overall"]), *report["by_length"].items()]:
        lines.append(f"{name:<20} {row['n']:>5} {100 * row['rougeL']:>8.2f} {100 * row['exact_match']:>7.2f}")
    return "\n".join(lines)


def write_report(report: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1) + "\n")

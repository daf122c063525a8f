"""Train the quality benchmark's teacher and shared SFT-student start once, and ship them.

    python benchmarks/build_assets.py                 # both, into benchmarks/assets/ (~1 h, one CPU thread)
    python benchmarks/build_assets.py --only student  # the student start alone (the data do not need the teacher)

Writes ``benchmarks/assets/{teacher,student}/`` (Llama-style, safetensors, Hugging Face format),
``tokenizer/`` (the word-level tokenizer of benchmarks/tasks.py) and ``manifest.json``: SHA-256 of
every file, the recipe, and the teacher's greedy score on the test split (and on the first
``SUBSET`` test rows, which tests/test_assets.py reproduces on a CPU in under a minute).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from switchkd.training.data import DistillDataset, pad_sequences
from switchkd.training.evaluate import evaluate

from tasks import build_tokenizer, make_splits

ASSETS = Path(__file__).resolve().parent / "assets"
ROWS = (20000, 120, 240)  # train / validation / test rows of make_splits
SEED = 1234
BUCKETS = (32, 96, 192)
MAX_NEW = 288
SUBSET = 48
RECIPE = {"teacher": {"shape": (2, 128), "steps": 6500, "lr": 3e-3, "batch": 16, "every": 1000},
          "student": {"shape": (1, 64), "steps": 3000, "lr": 3e-3, "batch": 16, "every": 500}}


def tiny_llama(layers: int, width: int, vocab: int, seed: int = 0):
    """A small Llama-style model. Rotary positions matter here: GPT-2 models of this size, with learned
    absolute positions, did not learn to copy from the prompt within the CPU budget (RESULTS.md)."""
    torch.manual_seed(seed)
    heads = max(2, width // 32)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=heads, max_position_embeddings=1024,
                                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=1, pad_token_id=0))


def datasets(tokenizer, rows=ROWS, names=("train", "validation", "test")):
    """The benchmark's splits (make_splits(*rows, seed=SEED)) as DistillDatasets."""
    splits = make_splits(*rows, seed=SEED)
    return {name: DistillDataset([(r["prompt"], r["response"]) for r in splits[name]], tokenizer,
                                 max_prompt_tokens=64, max_length=400) for name in names}


def batches(items, batch, seed):
    """Endless batches of similar length (chunks of 64 batches sorted by length, then shuffled)."""
    rng = random.Random(seed)
    while True:
        chunk = rng.sample(items, min(len(items), 64 * batch))
        chunk.sort(key=lambda it: len(it["prompt_ids"]) + len(it["response_ids"]))
        group = [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
        rng.shuffle(group)
        yield from group


def train(model, dataset, steps, lr, batch, log, seed=0, evaluate_on=None, every=1000, save=None,
          device="cpu"):
    """Cross-entropy on responses, AdamW, linear warmup then cosine to 10% ; ``save`` at every evaluation."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    model.train()
    start, stream = time.perf_counter(), batches(dataset.items, batch, seed)
    for step in range(1, steps + 1):
        rows = next(stream)
        ids, mask, labels = pad_sequences([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows], 0,
                                         device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            log(f"step {step} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
        if evaluate_on is not None and (step % every == 0 or step == steps):
            log(f"step {step} validation {evaluate_on(model)}")
            if save is not None:
                model.save_pretrained(save, safe_serialization=True)
            model.train()
    return model.eval()


def greedy_score(model, tokenizer, dataset, limit=None):
    if limit is not None:
        dataset.items, dataset.references = dataset.items[:limit], dataset.references[:limit]
    report = evaluate(model, tokenizer, dataset, max_new_tokens=MAX_NEW, batch_size=48, buckets=BUCKETS,
                      progress=False)
    report.pop("predictions")
    return report


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(root: Path, extra: dict):
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")
    old = json.loads((root / "manifest.json").read_text()) if (root / "manifest.json").exists() else {}
    manifest = {**old, **extra, "files": {str(p.relative_to(root)): sha256(p) for p in files}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def build(which, root: Path, steps: dict, log, score_only=False):
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    data = datasets(tokenizer)
    val = DistillDataset([(p, r) for p, r in zip(
        [tokenizer.decode(it["prompt_ids"]) for it in data["validation"].items[:60]],
        data["validation"].references[:60], strict=True)], tokenizer)

    def on_validation(model):
        overall = greedy_score(model, tokenizer, val)["overall"]
        return f"ROUGE-L {100 * overall['rougeL']:.1f} exact {100 * overall['exact_match']:.1f}"

    extra = {}
    for name in which:
        spec = {**RECIPE[name], "steps": steps.get(name) or RECIPE[name]["steps"]}
        if score_only:
            model = LlamaForCausalLM.from_pretrained(root / name).eval()
        else:
            model = tiny_llama(*spec["shape"], len(tokenizer), seed=0)
            train(model, data["train"], spec["steps"], spec["lr"], spec["batch"], log, evaluate_on=on_validation,
                  every=spec["every"], save=root / name)
        test = greedy_score(model, tokenizer, data["test"])
        subset = greedy_score(model, tokenizer, datasets(tokenizer, names=["test"])["test"], limit=SUBSET)
        extra[name] = {**spec, "test": test, f"test_first_{SUBSET}": subset}
        log(f"{name}: test {json.dumps(test['overall'])}")
    extra.update(rows=ROWS, seed=SEED, max_new_tokens=MAX_NEW, buckets=BUCKETS, subset=SUBSET,
                 command="python benchmarks/build_assets.py " + " ".join(sys.argv[1:]))
    return write_manifest(root, extra)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["teacher", "student"], default=None)
    parser.add_argument("--teacher-steps", type=int, default=None)
    parser.add_argument("--student-steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--score-only", action="store_true", help="score and record models already in --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    which = [args.only] if args.only else ["teacher", "student"]
    args.out.mkdir(parents=True, exist_ok=True)
    build(which, args.out, {"teacher": args.teacher_steps, "student": args.student_steps},
          lambda line: print(line, flush=True), score_only=args.score_only)


if __name__ == "__main__":
    main()

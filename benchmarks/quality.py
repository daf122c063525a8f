"""Quality benchmark: does SWITCH give a better student than the other KD methods on long outputs?

    python benchmarks/quality.py --quick      # smoke run, a few minutes on a 2-core CPU
    python benchmarks/quality.py              # the full run (CPU, under an hour)

Pipeline, all offline: built-in tasks (switchkd.tasks) with their word-level tokenizer; a Llama-style
teacher trained from scratch on them; a much smaller student, first fine-tuned briefly on the
data (shared by every method), then trained by each method with the same steps, batch, optimiser
and seeds. The SWITCH threshold (tau0, decay) is chosen on the validation split; every method is
scored on the test split by ROUGE-L and exact match, overall and by reference length.
Writes benchmarks/results/quality[-quick].json, a markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from switchkd import SwitchKDConfig, SwitchKDTrainer
from switchkd.ops.spec import DEFAULT_DECAY, DEFAULT_TAU0
from switchkd.training.data import DistillDataset, pad_sequences
from switchkd.training.evaluate import evaluate, write_report

from harness import device_name, git_commit, versions
from tasks import build_tokenizer, make_splits

RESULTS = Path(__file__).resolve().parent / "results"
BUCKETS = (32, 96, 192)

# method: SwitchKDConfig overrides (equal budget; the policy values of switch methods come from the sweep)
METHODS = {
    "SFT": {"source": "dataset", "kd_weight": 0.0, "ce_weight": 1.0},
    "KD": {"source": "dataset", "loss_kind": "fkl"},
    "SeqKD": {"source": "teacher", "loss_kind": "fkl"},
    "GKD": {"source": "student", "loss_kind": "jsd", "kd_beta": 0.5},
    "DistiLLM": {"source": "adaptive", "loss_kind": "srkl"},
    "SKD": {"source": "switch", "policy": "topk", "top_k": 5, "loss_kind": "srkl"},
    "SWITCH": {"source": "switch", "policy": "exp", "loss_kind": "srkl"},
    "SWITCH-linear": {"source": "switch", "policy": "linear", "loss_kind": "srkl"},
    "SWITCH-constant": {"source": "switch", "policy": "constant", "loss_kind": "srkl"},
}

# sweep: (tau0, decay) tried with srkl; sweep_losses: other loss kinds tried at the best (tau0, decay)
QUICK = {"rows": (240, 24, 36), "teacher": (2, 64), "student": (1, 32), "teacher_steps": 250, "sft_steps": 40,
         "steps": 12, "batch": 8, "max_new": 96, "seeds": [0], "sweep": [(0.2, 0.01)], "sweep_losses": ["jsd"]}
FULL = {"rows": (4000, 120, 240), "teacher": (4, 128), "student": (2, 64), "teacher_steps": 3500, "sft_steps": 1000,
        "steps": 50, "batch": 8, "max_new": 300, "seeds": [0, 1, 2],
        "sweep": [(0.1, 0.005), (0.3, 0.005), (0.3, 0.02)], "sweep_losses": ["fkl", "jsd"]}


def tiny_llama(layers: int, width: int, vocab: int, seed: int):
    """A small Llama-style model. Rotary positions matter here: GPT-2 models of this size, with learned
    absolute positions, did not learn to copy from the prompt within the CPU budget (RESULTS.md)."""
    torch.manual_seed(seed)
    heads = max(2, width // 32)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=heads, max_position_embeddings=1024,
                                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=1, pad_token_id=0))


class SupervisedCollator:
    def __init__(self, pad: int):
        self.pad = pad

    def __call__(self, features):
        input_ids, mask, labels = pad_sequences([f["prompt_ids"] for f in features],
                                                [f["response_ids"] for f in features], self.pad, "cpu")
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train_supervised(model, dataset, steps, batch, lr, out, seed):
    """Plain cross-entropy on responses with transformers.Trainer (the teacher, the shared student start);
    batches of similar length waste little on padding."""
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=lr, warmup_steps=steps // 10, lr_scheduler_type="cosine", seed=seed,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=50,
                             remove_unused_columns=False, train_sampling_strategy="group_by_length")
    rows = [{**item, "input_ids": item["prompt_ids"] + item["response_ids"]} for item in dataset.items]  # lengths
    Trainer(model=model, args=args, train_dataset=rows, data_collator=SupervisedCollator(0)).train()
    return model


def distil(method, overrides, teacher, student_state, cfg, data, tokenizer, seed, out):
    student = tiny_llama(*cfg["student"], len(tokenizer), seed=0)
    student.load_state_dict(student_state)
    args = SwitchKDConfig(output_dir=str(out), max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                          learning_rate=1e-3, warmup_steps=cfg["steps"] // 10, seed=seed, save_strategy="no",
                          report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
                          max_new_tokens=cfg["max_new"], adaptive_warmup_ratio=0.3, **overrides)
    trainer = SwitchKDTrainer(model=student, teacher=teacher, args=args, train_dataset=data["train"],
                              processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    shares = [h["teacher_share"] for h in trainer.state.log_history if "teacher_share" in h]
    return student, seconds, (statistics.mean(shares) if shares else None)


def score(model, tokenizer, dataset, cfg):
    report = evaluate(model, tokenizer, dataset, max_new_tokens=cfg["max_new"] + 8, batch_size=32, buckets=BUCKETS,
                      progress=False)
    report.pop("predictions")
    return report


def summarise(runs):
    """mean and population spread over seeds of every score."""

    def stats(values):
        values = [v for v in values if v == v]
        return {"mean": statistics.mean(values) if values else float("nan"),
                "std": statistics.pstdev(values) if len(values) > 1 else 0.0}

    first = runs[0]["scores"]
    return {
        "rougeL": stats([r["scores"]["overall"]["rougeL"] for r in runs]),
        "exact_match": stats([r["scores"]["overall"]["exact_match"] for r in runs]),
        "by_length": {b: stats([r["scores"]["by_length"][b]["rougeL"] for r in runs]) for b in first["by_length"]},
        "teacher_share": stats([r["teacher_share"] for r in runs if r["teacher_share"] is not None]),
        "seconds": stats([r["seconds"] for r in runs]),
    }


def markdown(report) -> str:
    buckets = list(next(iter(report["methods"].values()))["by_length"])
    head = ["method", "ROUGE-L", "exact", *[f"R-L {b}" for b in buckets], "teacher share", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def fmt(s, scale=100):
        return f"{scale * s['mean']:.1f} ± {scale * s['std']:.1f}" if s["mean"] == s["mean"] else "-"

    for name, m in report["methods"].items():
        cells = [name, fmt(m["rougeL"]), fmt(m["exact_match"]), *[fmt(m["by_length"][b]) for b in buckets],
                 fmt(m["teacher_share"], 1) if m["teacher_share"]["mean"] == m["teacher_share"]["mean"] else "-",
                 f"{m['seconds']['mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    teacher = report["teacher"]
    overall = teacher["overall"]
    lines.append(f"| teacher | {100 * overall['rougeL']:.1f} | {100 * overall['exact_match']:.1f} | "
                 + " | ".join(f"{100 * teacher['by_length'][b]['rougeL']:.1f}" for b in buckets) + " | - | - |")
    if report["sweep"]:
        lines += ["", "Validation sweep of SWITCH (seed 0):", "",
                  "| tau0 | decay | loss | val ROUGE-L | teacher share |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {t['tau0']} | {t['decay']} | {t['loss_kind']} | {100 * t['validation_rougeL']:.1f} | "
                  f"{t['teacher_share']:.2f} |" for t in report["sweep"]]
    return "\n".join(lines)


def plot(report, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    buckets = list(next(iter(report["methods"].values()))["by_length"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, m in report["methods"].items():
        means = [100 * m["by_length"][b]["mean"] for b in buckets]
        ax.plot(buckets, means, marker="o", label=name, linewidth=2.5 if name == "SWITCH" else 1.2)
    ax.set_xlabel("reference length (tokens)")
    ax.set_ylabel("ROUGE-L F (test)")
    ax.set_title("Student quality by output length")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (minutes)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=None, help="report JSON path")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps per method (overrides the mode)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (overrides the mode)")
    parser.add_argument("--no-sweep", action="store_true",
                        help="skip the validation sweep: SWITCH uses the library's policy defaults and srkl")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        cfg["steps"] = args.steps
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    if args.no_sweep:
        cfg.update(sweep=[], sweep_losses=[])
    work = RESULTS / ("quality-quick-work" if args.quick else "quality-work")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(work / "tokenizer")  # Hugging Face format, for `switchkd eval` on the saved models
    splits = make_splits(*cfg["rows"], seed=1234)
    data = {name: DistillDataset([(r["prompt"], r["response"]) for r in rows], tokenizer, max_prompt_tokens=200,
                                 max_length=520) for name, rows in splits.items()}
    started = time.perf_counter()

    vocab = len(tokenizer)
    teacher = train_supervised(tiny_llama(*cfg["teacher"], vocab, seed=0), data["train"], cfg["teacher_steps"], 16,
                               3e-3, work / "teacher", seed=0).eval()
    teacher_scores = score(teacher, tokenizer, data["test"], cfg)
    print(f"teacher test ROUGE-L {100 * teacher_scores['overall']['rougeL']:.1f} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    student_start = train_supervised(tiny_llama(*cfg["student"], vocab, seed=0), data["train"], cfg["sft_steps"], 16,
                                     3e-3, work / "student-sft", seed=0).state_dict()

    def trial(tau0, decay, loss_kind):
        overrides = {**METHODS["SWITCH"], "tau0": tau0, "decay": decay, "loss_kind": loss_kind}
        student, _, share = distil("SWITCH", overrides, teacher, student_start, cfg, data, tokenizer, 0, work / "sweep")
        val = score(student, tokenizer, data["validation"], cfg)["overall"]["rougeL"]
        print(f"sweep tau0={tau0} decay={decay} {loss_kind}: validation ROUGE-L {100 * val:.1f}, share {share}",
              flush=True)
        return {"tau0": tau0, "decay": decay, "loss_kind": loss_kind, "validation_rougeL": val, "teacher_share": share}

    def best_of(trials, default):
        return max(trials, key=lambda t: t["validation_rougeL"], default=default)

    loss_kind = METHODS["SWITCH"]["loss_kind"]
    sweep = [trial(tau0, decay, loss_kind) for tau0, decay in cfg["sweep"]]
    defaults = {"tau0": DEFAULT_TAU0, "decay": DEFAULT_DECAY, "loss_kind": loss_kind}  # used with --no-sweep
    best = best_of(sweep, defaults)
    sweep += [trial(best["tau0"], best["decay"], kind) for kind in cfg["sweep_losses"]]
    best = best_of(sweep, best)

    methods = {}
    for name in args.methods:
        overrides = dict(METHODS[name])
        if overrides.get("source") == "switch" and overrides["policy"] != "topk":
            decay = best["decay"] if overrides["policy"] == "exp" else best["tau0"] / cfg["max_new"]
            overrides.update(tau0=best["tau0"], decay=decay, loss_kind=best["loss_kind"])
        runs = []
        for seed in cfg["seeds"]:
            student, seconds, share = distil(name, overrides, teacher, student_start, cfg, data, tokenizer, seed,
                                             work / name)
            runs.append({"seed": seed, "seconds": seconds, "teacher_share": share,
                         "scores": score(student, tokenizer, data["test"], cfg)})
        methods[name] = summarise(runs)
        print(f"{name}: test ROUGE-L {100 * methods[name]['rougeL']['mean']:.1f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    report = {"mode": "quick" if args.quick else "full", "config": cfg, "sweep": sweep, "chosen": best,
              "teacher": teacher_scores, "methods": methods, "wall_seconds": time.perf_counter() - started,
              "command": " ".join(["python benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device_name("cpu"), "commit": git_commit(), **versions()}
    out = args.out or RESULTS / ("quality-quick.json" if args.quick else "quality.json")
    write_report(report, out)
    table = markdown(report)
    out.with_suffix(".md").write_text(table + "\n")
    png = plot(report, out.with_suffix(".png"))
    print(table)
    print(f"wrote {out}, {out.with_suffix('.md')}" + (f", {png}" if png else ""))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

"""Quality benchmark: does SWITCH give a better student than the other KD methods on long outputs?

    python benchmarks/quality.py --quick      # smoke run, a few minutes on a 2-core CPU
    python benchmarks/quality.py              # the full run (CPU, under an hour)
    python benchmarks/quality.py --device cuda  # a larger scale on a GPU (teacher and student trained first)

Pipeline, all offline: built-in tasks (benchmarks/tasks.py) with their word-level tokenizer; the
teacher and the SFT student start shipped in benchmarks/assets/ (benchmarks/build_assets.py: a
Llama-style 2x128 teacher and a 1x64 student, half its layers and width, fine-tuned on the data);
each method then trains the student start with the same steps, batch, optimiser and seeds. The
SWITCH threshold (tau0, decay) and loss are chosen on the validation split; every method is scored
greedily on the test split by ROUGE-L and exact match, overall and by reference length, and
compared with SWITCH by paired differences (same prompts, same seeds) with 95% bootstrap intervals.
Writes benchmarks/results/quality[-quick].json, a markdown report and a PNG plot.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import quality_report
import torch
from build_assets import ASSETS, datasets, tiny_llama, train
from transformers import AutoTokenizer, LlamaForCausalLM

import switchkd
from switchkd import SwitchKDConfig, SwitchKDTrainer
from switchkd.ops.spec import DEFAULT_DECAY, DEFAULT_TAU0
from switchkd.training.evaluate import generate_responses, rouge_l, write_report

from harness import device_name, git_commit, versions

RESULTS = Path(__file__).resolve().parent / "results"

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

# sweep: (tau0, decay) tried with srkl; sweep_losses: other loss kinds tried at the best (tau0, decay).
# validation/test: how many rows of those splits are scored (None = all).
FULL = {"steps": 30, "batch": 32, "lr": 3e-4, "max_new": 288, "seeds": [0, 1, 2, 3, 4], "validation": 48,
        "test": None, "sweep": [(0.01, 0.0005), (0.03, 0.001), (0.1, 0.005), (0.3, 0.01)], "sweep_losses": []}
QUICK = {"steps": 3, "batch": 4, "lr": 1e-3, "max_new": 64, "seeds": [0], "validation": 8, "test": 24,
         "sweep": [(0.3, 0.01)], "sweep_losses": []}
# --device cuda: teacher and student start trained in the run, larger, and more distillation (sized by
# estimate; never run: no GPU was available where this was written)
GPU = {**FULL, "teacher": (4, 256), "student": (2, 128), "teacher_steps": 4000, "sft_steps": 1000, "steps": 40,
       "batch": 64, "validation": 120, "sweep_losses": ["fkl", "jsd"]}


def load_models(cfg, tokenizer, data, device, assets=ASSETS):
    """The shipped teacher and SFT student start, or (cfg has "teacher") both trained here on ``device``."""
    if "teacher" not in cfg:
        teacher = LlamaForCausalLM.from_pretrained(assets / "teacher")
        student = LlamaForCausalLM.from_pretrained(assets / "student")
        return teacher.to(device).eval(), student.to(device)
    log = lambda line: print(line, flush=True)  # noqa: E731
    teacher = tiny_llama(*cfg["teacher"], len(tokenizer)).to(device)
    train(teacher, data["train"], cfg["teacher_steps"], 3e-3, 32, log, device=device)
    student = tiny_llama(*cfg["student"], len(tokenizer)).to(device)
    train(student, data["train"], cfg["sft_steps"], 3e-3, 32, log, device=device)
    return teacher.eval(), student


def distil(overrides, teacher, start, cfg, data, tokenizer, seed, out, device):
    """Train a copy of the student start by one method; (student, train seconds, mean teacher share)."""
    student = copy.deepcopy(start)
    args = SwitchKDConfig(output_dir=str(out), max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                          learning_rate=cfg["lr"], warmup_steps=cfg["steps"] // 10, seed=seed, save_strategy="no",
                          report_to=[], use_cpu=device == "cpu", disable_tqdm=True, logging_steps=1,
                          max_new_tokens=cfg["max_new"], adaptive_warmup_ratio=0.3, **overrides)
    trainer = SwitchKDTrainer(model=student, teacher=teacher, args=args, train_dataset=data["train"],
                              processing_class=tokenizer)
    start_time = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start_time
    shares = [h["teacher_share"] for h in trainer.state.log_history if "teacher_share" in h]
    return student.eval(), seconds, (statistics.mean(shares) if shares else None)


def score_rows(model, tokenizer, dataset, cfg):
    """Greedy responses to every prompt of ``dataset``; per-prompt ROUGE-L F and exact match."""
    prompts = [item["prompt_ids"] for item in dataset.items]
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=cfg["max_new"] + 8, batch_size=48,
                                   progress=False)
    predictions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    pairs = list(zip(predictions, dataset.references, strict=True))
    return {"rougeL": [round(rouge_l(p, [r]), 5) for p, r in pairs], "exact": [float(p.strip() == r.strip())
                                                                               for p, r in pairs]}


def subset(dataset, n):
    if n is not None:
        dataset.items, dataset.references = dataset.items[:n], dataset.references[:n]
    return dataset


def sweep(cfg, run_all):
    """SWITCH's (tau0, decay) with srkl, then the other loss kinds at the best point, by validation ROUGE-L."""
    loss_kind = METHODS["SWITCH"]["loss_kind"]
    trials = run_all([(tau0, decay, loss_kind) for tau0, decay in cfg["sweep"]])
    defaults = {"tau0": DEFAULT_TAU0, "decay": DEFAULT_DECAY, "loss_kind": loss_kind}  # with --no-sweep
    best = max(trials, key=lambda t: t["validation_rougeL"], default=defaults)
    trials += run_all([(best["tau0"], best["decay"], kind) for kind in cfg["sweep_losses"]])
    return trials, max(trials, key=lambda t: t["validation_rougeL"], default=best)


_CONTEXT = {}  # models, data and config of the run; set before the worker processes fork


def _trial(params):
    c, (tau0, decay, loss_kind) = _CONTEXT, params
    overrides = {**METHODS["SWITCH"], "tau0": tau0, "decay": decay, "loss_kind": loss_kind}
    student, _, share = distil(overrides, c["teacher"], c["start"], c["cfg"], c["data"], c["tokenizer"], 0,
                               c["work"] / "sweep", c["device"])
    rows = score_rows(student, c["tokenizer"], c["data"]["validation"], c["cfg"])["rougeL"]
    val = sum(rows) / len(rows)
    log(f"sweep tau0={tau0} decay={decay} {loss_kind}: validation ROUGE-L {100 * val:.1f}, share {share}")
    return {"tau0": tau0, "decay": decay, "loss_kind": loss_kind, "validation_rougeL": val, "teacher_share": share}


def _method_run(job):
    c, (name, seed, overrides) = _CONTEXT, job
    student, seconds, share = distil(overrides, c["teacher"], c["start"], c["cfg"], c["data"], c["tokenizer"], seed,
                                     c["work"] / name, c["device"])
    rows = score_rows(student, c["tokenizer"], c["data"]["test"], c["cfg"])
    run = {"seed": seed, "seconds": seconds, "teacher_share": share, "rows": rows,
           "scores": quality_report.scores(rows, c["lengths"])}
    log(f"{name} seed {seed}: test ROUGE-L {100 * run['scores']['overall']['rougeL']:.1f}, train {seconds:.0f} s")
    return name, run


def _map(fn, items, jobs, on_result=None):
    """``[fn(item) ...]`` (in order), in ``jobs`` forked worker processes (one torch thread each) when jobs > 1;
    ``on_result(results so far)`` after each one."""
    results = {}

    def keep(i, result):
        results[i] = result
        if on_result is not None:
            on_result([results[k] for k in sorted(results)])

    if jobs <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            keep(i, fn(item))
    else:
        with multiprocessing.get_context("fork").Pool(min(jobs, len(items))) as pool:
            for i, result in pool.imap_unordered(_indexed, [(fn, i, item) for i, item in enumerate(items)]):
                keep(i, result)
    return [results[k] for k in sorted(results)]


def _indexed(job):
    fn, i, item = job
    return i, fn(item)


def method_overrides(name, best, cfg):
    overrides = dict(METHODS[name])
    if overrides.get("source") == "switch" and overrides["policy"] != "topk":
        decay = best["decay"] if overrides["policy"] == "exp" else best["tau0"] / cfg["max_new"]
        overrides.update(tau0=best["tau0"], decay=decay, loss_kind=best["loss_kind"])
    return overrides


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (minutes)")
    parser.add_argument("--device", default="cpu", help="cpu (shipped assets) or cuda (larger models trained here)")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="teacher, student and tokenizer folders")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes on a CPU (one torch thread each)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=None, help="report JSON path")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps per method (overrides the mode)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (overrides the mode)")
    parser.add_argument("--sweep", type=float, nargs="+", default=None, metavar="TAU0 DECAY",
                        help="(tau0, decay) pairs of the sweep (overrides the mode)")
    parser.add_argument("--no-sweep", action="store_true",
                        help="skip the validation sweep: SWITCH uses the library's policy defaults and srkl")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else ("gpu" if args.device.startswith("cuda") else "full")
    cfg = dict({"quick": QUICK, "full": FULL, "gpu": GPU}[mode])
    cfg.update({k: v for k, v in (("steps", args.steps), ("seeds", args.seeds)) if v is not None})
    if args.sweep is not None:
        if len(args.sweep) % 2:
            raise ValueError("--sweep takes (tau0, decay) pairs")
        cfg["sweep"] = list(zip(args.sweep[::2], args.sweep[1::2], strict=True))
    if args.no_sweep:
        cfg.update(sweep=[], sweep_losses=[])
    return args, mode, cfg


def main(argv=None):
    args, mode, cfg = parse(argv)
    device, jobs = args.device, args.jobs if args.device == "cpu" else 1
    if device == "cpu":
        torch.set_num_threads(1)  # the CPU is shared; one thread was far faster than two under load
    tokenizer = AutoTokenizer.from_pretrained(args.assets / "tokenizer")
    data = datasets(tokenizer)
    subset(data["validation"], cfg["validation"])
    subset(data["test"], cfg["test"])
    lengths = [len(item["response_ids"]) - 1 for item in data["test"].items]  # EOS excluded
    _CONTEXT.update(started=time.perf_counter(), cfg=cfg, data=data, tokenizer=tokenizer, lengths=lengths,
                    device=device, work=RESULTS / f"quality-{mode}-work")
    teacher, start = load_models(cfg, tokenizer, data, device, args.assets)
    _CONTEXT.update(teacher=teacher, start=start)
    teacher_rows = score_rows(teacher, tokenizer, data["test"], cfg)
    teacher_scores = quality_report.scores(teacher_rows, lengths)
    start_rows = score_rows(start, tokenizer, data["test"], cfg)  # the SFT student start, before any method
    log(f"teacher test ROUGE-L {100 * teacher_scores['overall']['rougeL']:.1f}, student start "
        f"{100 * quality_report.scores(start_rows, lengths)['overall']['rougeL']:.1f}")
    trials, best = sweep(cfg, lambda params: _map(_trial, params, jobs))
    todo = [(name, seed, method_overrides(name, best, cfg)) for name in args.methods for seed in cfg["seeds"]]
    todo.sort(key=lambda job: job[1])  # seed by seed: a run cut short still has whole seeds
    partial = _CONTEXT["work"] / "partial.json"  # what has run so far, for a run that is cut short
    done = _map(_method_run, todo, jobs, lambda done: write_report(
        {"sweep": trials, "chosen": best, "teacher_rows": teacher_rows, "lengths": lengths, "done": done}, partial))
    runs = {name: sorted((run for n, run in done if n == name), key=lambda r: r["seed"]) for name in args.methods}
    return finish(args, mode, cfg, device, trials, best, {"teacher": teacher_rows, "start": start_rows}, runs,
                  lengths, _CONTEXT["started"], argv)


def log(line):
    print(f"{line} ({time.perf_counter() - _CONTEXT['started']:.0f} s)", flush=True)


def finish(args, mode, cfg, device, trials, best, reference_rows, runs, lengths, started, argv):
    """Statistics, verdicts, and the JSON, markdown and PNG files."""
    methods = {name: quality_report.summarise(method_runs) for name, method_runs in runs.items()}
    paired = {name: quality_report.paired(runs["SWITCH"], method_runs, lengths)
              for name, method_runs in runs.items() if name != "SWITCH" and "SWITCH" in runs}
    teacher_rows = reference_rows["teacher"]
    report = {"mode": mode, "config": cfg, "sweep": trials, "chosen": best,
              "teacher": quality_report.scores(teacher_rows, lengths),
              "start": quality_report.scores(reference_rows["start"], lengths),
              "methods": methods, "paired": paired, "wall_seconds": time.perf_counter() - started,
              "command": " ".join(["python benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device_name(device), "jobs": args.jobs, "commit": git_commit(), **versions(),
              "switchkd_path": str(Path(switchkd.__file__).resolve().parent)}
    report["regime"] = quality_report.regime(report)
    report["claims"] = quality_report.claims(report)
    report["test_reference_lengths"] = lengths
    report["rows"] = {**reference_rows, **{name: {r["seed"]: r["rows"] for r in method_runs}
                                                  for name, method_runs in runs.items()}}
    out = args.out or RESULTS / ("quality-quick.json" if mode == "quick" else f"quality{'-gpu' * (mode == 'gpu')}.json")
    write_report(report, out)
    table = quality_report.markdown(report)
    out.with_suffix(".md").write_text(table + "\n")
    png = quality_report.plot(report, runs, reference_rows, lengths, out.with_suffix(".png"))
    print(table)
    print(f"wrote {out}, {out.with_suffix('.md')}" + (f", {png}" if png else ""))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

"""``switchkd`` command line: distill | generate | eval | bench."""

from __future__ import annotations

import argparse
import json
import logging
import runpy
import sys
from pathlib import Path

from .ops.spec import DEFAULT_DECAY, DEFAULT_TAU0, DEFAULT_TOP_K, LOSS_KINDS, POLICY_KINDS


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line."""


def _load(model_dir: str, what: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UsageError(f"{what} directory {model_dir!r} has no config.json (a saved Hugging Face model is needed)")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _dataset(path, tokenizer, args):
    from .training.data import DistillDataset

    return DistillDataset(path, tokenizer, max_prompt_tokens=args.max_prompt_tokens, max_length=args.max_length)


def _require_file(path: str, what: str):
    if not Path(path).is_file():
        raise UsageError(f"no such {what} file: {path}")


def cmd_distill(args):
    from .decoding.generator import _vocab_size
    from .training import SwitchKDConfig, SwitchKDTrainer

    _require_file(args.train, "training data")
    teacher, _ = _load(args.teacher, "teacher")
    student, tokenizer = _load(args.student, "student")
    if _vocab_size(teacher) != _vocab_size(student):
        raise UsageError(f"teacher and student vocabularies differ ({_vocab_size(teacher)} vs "
                         f"{_vocab_size(student)} tokens): they must share a tokenizer")
    dataset = _dataset(args.train, tokenizer, args)
    config = SwitchKDConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.learning_rate, seed=args.seed,
        logging_steps=args.logging_steps, save_steps=args.save_steps, save_total_limit=2, report_to=args.report_to,
        use_cpu=args.cpu, source=args.source, loss_kind=args.loss, kd_alpha=args.alpha, kd_beta=args.beta,
        kd_temperature=args.kd_temperature, ce_weight=args.ce_weight, policy=args.policy, tau0=args.tau0,
        decay=args.decay, top_k=args.top_k, max_new_tokens=args.max_new_tokens, gen_temperature=args.temperature,
        draft_len=args.draft_len, fused_linear_loss=args.fused_linear_loss,
    )
    trainer = SwitchKDTrainer(model=student, teacher=teacher, args=config, train_dataset=dataset,
                              processing_class=tokenizer)
    resume = args.resume if args.resume != "latest" else True
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        print(f"saved the distilled student to {args.output_dir}")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # destroys the process group: gloo aborts at exit otherwise


def cmd_generate(args):
    from .training.evaluate import generate_responses

    model, tokenizer = _load(args.model, "model")
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        _require_file(args.data, "prompt data")
        from .training.data import read_jsonl

        prompts = [p for p, _ in read_jsonl(args.data)]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    responses = generate_responses(model, tokenizer, ids, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, batch_size=args.batch_size, seed=args.seed)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    rows = [{"prompt": p, "response": t} for p, t in zip(prompts, texts, strict=True)]
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} responses to {args.out}")
    else:
        for row in rows:
            print(row["response"])


def cmd_eval(args):
    from .training.evaluate import evaluate, format_table, write_report

    _require_file(args.data, "test data")
    model, tokenizer = _load(args.model, "model")
    dataset = _dataset(args.data, tokenizer, args)
    report = evaluate(model, tokenizer, dataset, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      batch_size=args.batch_size)
    report["model"], report["data"] = args.model, args.data
    print(format_table(report))
    if args.out:
        write_report(report, args.out)
        print(f"wrote {args.out}")


def cmd_bench(args):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
    if not script.is_file():
        raise UsageError("switchkd bench runs benchmarks/throughput.py from a source checkout; none found")
    sys.argv = [str(script), *args.bench_args]
    runpy.run_path(str(script), run_name="__main__")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchkd", description="Distil Hugging Face LMs with SWITCH.")
    sub = parser.add_subparsers(dest="command", required=True)

    def data_limits(p):
        p.add_argument("--max-prompt-tokens", type=int, default=256, help="drop rows with longer prompts")
        p.add_argument("--max-length", type=int, default=512, help="drop rows with longer prompt + response")

    def sampling(p, max_new=128):
        p.add_argument("--max-new-tokens", type=int, default=max_new, help="tokens generated per prompt")
        p.add_argument("--temperature", type=float, default=None, help="sampling temperature (0 = greedy)")
        p.add_argument("--seed", type=int, default=0, help="random seed")

    d = sub.add_parser("distill", help="distil a student from a teacher on a JSONL file")
    d.add_argument("--teacher", required=True, help="teacher model directory (Hugging Face format)")
    d.add_argument("--student", required=True, help="student model directory (its tokenizer is used)")
    d.add_argument("--train", required=True, help="training JSONL: {prompt, response} or Dolly rows")
    d.add_argument("--output-dir", required=True, help="checkpoints and the final student go here")
    d.add_argument("--source", default="switch", choices=["switch", "student", "teacher", "dataset", "adaptive"],
                   help="where each step's responses come from")
    d.add_argument("--loss", default="srkl", choices=LOSS_KINDS, help="KD loss kind")
    d.add_argument("--alpha", type=float, default=0.1, help="skew of skl/srkl")
    d.add_argument("--beta", type=float, default=0.5, help="jsd weight")
    d.add_argument("--kd-temperature", type=float, default=1.0, help="temperature of the KD loss")
    d.add_argument("--ce-weight", type=float, default=0.0, help="cross-entropy weight on dataset responses")
    d.add_argument("--fused-linear-loss", action="store_true",
                   help="KD loss from hidden states and LM heads, without full [N, V] logits (large vocabularies)")
    d.add_argument("--policy", default="exp", choices=POLICY_KINDS, help="switch policy for --source switch")
    d.add_argument("--tau0", type=float, default=DEFAULT_TAU0, help="initial JSD threshold (nats)")
    d.add_argument("--decay", type=float, default=DEFAULT_DECAY, help="threshold decay per generated token")
    d.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="k of the topk policy")
    d.add_argument("--draft-len", type=int, default=4, help="most student tokens drafted per teacher forward")
    d.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    d.add_argument("--batch-size", type=int, default=8, help="sequences per device per step")
    d.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    d.add_argument("--learning-rate", type=float, default=5e-5, help="peak learning rate")
    d.add_argument("--logging-steps", type=int, default=10, help="log every N steps")
    d.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps")
    d.add_argument("--resume", default=None, help="checkpoint directory to resume from, or 'latest'")
    d.add_argument("--report-to", nargs="*", default=[], help="Trainer integrations (tensorboard, wandb, ...)")
    d.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    data_limits(d)
    sampling(d)
    d.set_defaults(func=cmd_distill)

    g = sub.add_parser("generate", help="generate responses with one model")
    g.add_argument("--model", required=True, help="model directory (Hugging Face format)")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--data", help="JSONL file of prompts")
    g.add_argument("--out", help="write {prompt, response} JSONL here instead of printing")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    sampling(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="ROUGE-L and exact match on a JSONL test set, by reference length")
    e.add_argument("--model", required=True, help="model directory (Hugging Face format)")
    e.add_argument("--data", required=True, help="test JSONL: {prompt, response} or Dolly rows")
    e.add_argument("--out", help="write the JSON report here")
    e.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    data_limits(e)
    sampling(e)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="run benchmarks/throughput.py (source checkout); options pass through")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of benchmarks/throughput.py")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "temperature", 0) is None:
        args.temperature = 1.0 if args.command == "distill" else 0.0
    logging.basicConfig(level=logging.WARNING, format="switchkd: %(message)s")
    try:
        args.func(args)
    except (UsageError, FileNotFoundError, ValueError, TypeError, OSError) as err:
        print(f"switchkd: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

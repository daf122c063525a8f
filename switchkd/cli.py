"""``switchkd`` command line: distill | generate | eval | bench.

The options are generated from dataclasses with ``HfArgumentParser`` (one source of every default and
help text): ``distill`` takes :class:`DistillArguments` (models, data, resume, LoRA) and every field of
``SwitchKDConfig`` (the distillation options and all of ``TrainingArguments``); ``generate`` and ``eval``
take :class:`GenerateArguments` / :class:`EvalArguments`. ``bench`` hands its options to
``benchmarks/throughput.py``. Bad input is answered by one line naming the flag, before any work is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import runpy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line."""


def _help(text: str, **more) -> dict:
    return {"help": text, **more}


@dataclass(kw_only=True)
class DataLimits:
    max_prompt_tokens: int = field(default=256, metadata=_help("drop rows with longer prompts (tokens)"))
    max_length: int = field(default=512, metadata=_help("drop rows with longer prompt + response (tokens)"))

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_length"):
            if getattr(self, name) < 1:
                raise UsageError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class DistillArguments(DataLimits):
    """What ``distill`` needs besides the config: models, data, resume and LoRA."""

    teacher: str = field(metadata=_help("teacher: a Hugging Face model directory or model id"))
    student: str = field(metadata=_help("student: a model directory or id (its tokenizer is used)"))
    train: str = field(metadata=_help("training JSONL: {prompt, response}, Dolly or {messages} (chat) rows"))
    eval_file: str | None = field(default=None, metadata=_help(
        "JSONL scored by the KD loss on its responses during training (eval_loss; --eval-strategy steps "
        "unless set)"))
    resume: str | None = field(default=None, metadata=_help(
        "a checkpoint directory, or 'latest': the newest complete checkpoint of --output-dir"))
    use_peft: bool = field(default=False, metadata=_help(
        "train LoRA adapters (needs peft) instead of the whole student; only the adapters are saved"))
    lora_r: int = field(default=16, metadata=_help("LoRA rank"))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha (scale = alpha / r)"))
    lora_dropout: float = field(default=0.05, metadata=_help("LoRA dropout"))
    lora_target_modules: list[str] | None = field(default=None, metadata=_help(
        "module names that get adapters (default: every linear layer but the LM head)"))


@dataclass(kw_only=True)
class SamplingArguments:
    model: str = field(metadata=_help("a model directory or id (a LoRA output folder works too)"))
    out: str | None = field(default=None, metadata=_help("write the results here (its folder must exist)"))
    batch_size: int = field(default=8, metadata=_help("prompts per generate call"))
    max_new_tokens: int = field(default=128, metadata=_help("tokens generated per prompt"))
    temperature: float = field(default=0.0, metadata=_help("sampling temperature (0 = greedy)"))
    seed: int = field(default=0, metadata=_help("random seed of the sampling"))

    def __post_init__(self):
        if self.temperature < 0:
            raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.out is not None:
            _check_writable(self.out, "--out")


@dataclass(kw_only=True)
class GenerateArguments(SamplingArguments):
    prompt: str | None = field(default=None, metadata=_help("one prompt"))
    data: str | None = field(default=None, metadata=_help("JSONL of prompts (rows as for distill)"))
    prompt_format: Literal["auto", "raw", "instruction", "chat"] = field(default="auto", metadata=_help(
        "how --prompt is wrapped: auto = as the model was distilled (raw when unknown), raw text, Dolly's "
        "instruction template, or one chat user turn (the tokenizer's chat template)"))

    def __post_init__(self):
        if (self.prompt is None) == (self.data is None):
            raise UsageError("give exactly one of --prompt and --data")
        if self.prompt is not None and not self.prompt.strip():
            raise UsageError("--prompt is empty")
        if self.data is not None:
            _require_file(self.data, "--data")
        super().__post_init__()


@dataclass(kw_only=True)
class EvalArguments(SamplingArguments, DataLimits):
    data: str = field(metadata=_help("test JSONL (rows as for distill)"))

    def __post_init__(self):
        _require_file(self.data, "--data")
        SamplingArguments.__post_init__(self)
        DataLimits.__post_init__(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flags_named(message: str, names) -> str:
    """An error message with the field names a user never typed (``max_new_tokens``) as flags."""
    for name in sorted((n for n in names if "_" in n or n in ("tau0", "decay", "lmbda")), key=len, reverse=True):
        message = re.sub(rf"(?<![\w\-/.]){re.escape(name)}(?![\w])", _flag(name), message)
    return message


def _require_file(path: str, flag: str):
    if not Path(path).is_file():
        raise UsageError(f"{flag}: no such file: {path}")


def _check_writable(path: str, flag: str):
    """Fail before any work (and create nothing) when ``path`` cannot be written."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise UsageError(f"{flag} {path} is a directory")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: no such directory {folder}")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"{flag} {path} is not writable")


def _loaded(loader, name: str, flag: str, what: str, *args):
    """``loader(name, *args)``, its failure as one line naming the flag."""
    try:
        return loader(name, *args)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"{flag} {name}: cannot load its {what} ({reason})") from None


def _model(name: str, flag: str, init_kwargs=None):
    from .training.models import load_model

    return _loaded(lambda n: load_model(n, init_kwargs, name=flag.lstrip("-")), name, flag, "model")


def _tokenizer(name: str, flag: str):
    from .training.models import load_tokenizer

    return _loaded(load_tokenizer, name, flag, "tokenizer")


# ------------------------------------------------------------------------------------------ distill
def _resume_from(script: DistillArguments, output_dir: str) -> str | None:
    """The checkpoint to resume from: 'latest' = the newest complete one of ``output_dir`` (said which)."""
    from .training.checkpoints import is_complete, latest_complete

    if script.resume is None:
        return None
    if script.resume != "latest":
        if not Path(script.resume).is_dir():
            raise UsageError(f"--resume {script.resume}: no such checkpoint directory")
        if not is_complete(script.resume):
            raise UsageError(f"--resume {script.resume}: incomplete checkpoint (interrupted during its save?); "
                             "--resume latest takes the newest complete one")
        return script.resume
    found, skipped = latest_complete(output_dir)
    if found is None:
        raise UsageError(f"--resume latest: no complete checkpoint in {output_dir}")
    note = f" (skipped incomplete {', '.join(p.name for p in skipped)})" if skipped else ""
    print(f"switchkd: resuming from {found}{note}")
    return str(found)


def _distill_data(script: DistillArguments, tokenizer):
    from .training.data import DistillDataset, read_jsonl

    _require_file(script.train, "--train")
    if script.eval_file is not None:
        _require_file(script.eval_file, "--eval-file")
    limits = {"max_prompt_tokens": script.max_prompt_tokens, "max_length": script.max_length}
    train = DistillDataset(read_jsonl(script.train), tokenizer, **limits)
    evaluation = DistillDataset(read_jsonl(script.eval_file), tokenizer, **limits) if script.eval_file else None
    return train, evaluation


def cmd_distill(script: DistillArguments, config):
    from .training import SwitchKDTrainer
    from .training.checkpoints import check_output_dir
    from .training.data import save_prompt_format
    from .training.models import check_vocabularies, lora_config

    if Path(config.output_dir).is_file():
        raise UsageError(f"--output-dir {config.output_dir} is a file")
    check_output_dir(config.output_dir, resume=script.resume is not None, overwrite=config.overwrite_output_dir)
    resume = _resume_from(script, config.output_dir)
    tokenizer = _tokenizer(script.student, "--student")
    check_vocabularies(_tokenizer(script.teacher, "--teacher"), tokenizer)
    train, evaluation = _distill_data(script, tokenizer)
    peft_config = (lora_config(script.lora_r, script.lora_alpha, script.lora_dropout, script.lora_target_modules)
                   if script.use_peft else None)
    teacher = _model(script.teacher, "--teacher", config.teacher_model_init_kwargs)
    student = _model(script.student, "--student", config.model_init_kwargs)
    trainer = SwitchKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=train,
                              eval_dataset=evaluation, processing_class=tokenizer, peft_config=peft_config)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
        save_prompt_format(config.output_dir, train.prompt_format)
        print(f"saved the distilled student{' (LoRA adapters)' if script.use_peft else ''} to {config.output_dir}")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # destroys the process group: gloo aborts at exit otherwise


def _config(values: dict):
    """``SwitchKDConfig`` from the parsed flags (``--eval-file`` turns step evaluation on unless set)."""
    from .training import SwitchKDConfig

    if values.get("output_dir") is None:
        raise UsageError("--output-dir is required")
    return SwitchKDConfig(**values)


# ------------------------------------------------------------------------------------- generate, eval
def _prompts(args: GenerateArguments, tokenizer) -> list[str]:
    from .training.data import as_example, prompt_text, read_jsonl, saved_prompt_format

    if args.prompt is not None:
        fmt = saved_prompt_format(args.model) if args.prompt_format == "auto" else args.prompt_format
        examples = [as_example(args.prompt, fmt)]
    else:
        examples = read_jsonl(args.data)
    return [prompt_text(e.prompt, tokenizer) for e in examples]


def cmd_generate(args: GenerateArguments):
    from .training.evaluate import generate_responses

    model, tokenizer = _model(args.model, "--model"), _tokenizer(args.model, "--model")
    texts = _prompts(args, tokenizer)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if not all(ids):
        raise UsageError(f"{'--prompt' if args.prompt is not None else '--data'}: a prompt gives no tokens")
    responses = generate_responses(model, tokenizer, ids, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, batch_size=args.batch_size, seed=args.seed)
    outputs = tokenizer.batch_decode(responses, skip_special_tokens=True)
    rows = [{"prompt": p, "response": r} for p, r in zip(texts, outputs, strict=True)]
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} responses to {args.out}")
    else:
        for row in rows:
            print(row["response"])


def cmd_eval(args: EvalArguments):
    from . import __version__
    from .training.data import DistillDataset, read_jsonl, saved_prompt_format
    from .training.evaluate import DEFAULT_BUCKETS, evaluate, format_table, write_report

    examples = read_jsonl(args.data)
    model, tokenizer = _model(args.model, "--model"), _tokenizer(args.model, "--model")
    dataset = DistillDataset(examples, tokenizer, max_prompt_tokens=args.max_prompt_tokens,
                             max_length=args.max_length)
    report = evaluate(model, tokenizer, dataset, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      batch_size=args.batch_size, seed=args.seed)
    report["settings"] = {**dataclasses.asdict(args), "buckets": list(DEFAULT_BUCKETS), "rows": len(examples),
                          "dropped_rows": dataset.dropped, "prompt_format": dataset.prompt_format,
                          "distilled_with_prompt_format": saved_prompt_format(args.model), "argv": sys.argv[1:],
                          "switchkd_version": __version__}
    print(format_table(report))
    if args.out:
        write_report(report, args.out)
        print(f"wrote {args.out}")


def cmd_bench(argv: list[str]):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
    if not script.is_file():
        raise UsageError("switchkd bench runs benchmarks/throughput.py from a source checkout; none found")
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


# -------------------------------------------------------------------------------------------- parser
USAGE = {"distill": "switchkd distill --teacher T --student S --train FILE --output-dir DIR [options]",
         "generate": "switchkd generate --model M (--prompt TEXT | --data FILE) [options]",
         "eval": "switchkd eval --model M --data FILE [options]"}


def _dataclass_types(command: str) -> list:
    if command == "distill":
        from .training import SwitchKDConfig

        return [DistillArguments, SwitchKDConfig]
    return [{"generate": GenerateArguments, "eval": EvalArguments}[command]]


def build_parser(commands=("distill", "generate", "eval")) -> argparse.ArgumentParser:
    """The ``switchkd`` parser; only the ``commands`` given get their (generated) options."""
    from transformers import HfArgumentParser

    parser = argparse.ArgumentParser(prog="switchkd", description="Distil Hugging Face LMs with SWITCH.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    helps = {"distill": "distil a student from a teacher on a JSONL file",
             "generate": "generate responses with one model",
             "eval": "ROUGE-L and exact match on a JSONL test set, by reference length"}
    for name, text in helps.items():
        sub.add_parser(name, help=text, description=text, usage=USAGE[name],
                       dataclass_types=_dataclass_types(name) if name in commands else [])
    sub.add_parser("bench", help="run benchmarks/throughput.py (source checkout); its options pass through",
                   add_help=False, dataclass_types=[])
    return parser


def _split(values: dict, types: list) -> list:
    """One instance per dataclass from the parsed flags (the last one takes what is left)."""
    out = []
    for cls in types[:-1]:
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        out.append(cls(**{n: values.pop(n) for n in names}))
    return out + [values]


def _run(command: str, values: dict):
    types = _dataclass_types(command)
    names = {f.name for cls in types for f in dataclasses.fields(cls)}
    try:
        if command == "distill":
            script, values = _split(values, types)
            script.resume = script.resume or values.pop("resume_from_checkpoint", None)  # the Trainer's name
            if script.eval_file and values.get("eval_strategy") == "no":
                values["eval_strategy"] = "steps"
            cmd_distill(script, _config(values))
        else:
            cls = types[0]
            args = cls(**values)
            (cmd_generate if command == "generate" else cmd_eval)(args)
    except (ValueError, TypeError, OSError, ImportError) as err:
        raise UsageError(_flags_named(str(err).strip().splitlines()[0], names)) from None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="switchkd: %(message)s")
    try:
        if argv[:1] == ["bench"]:
            cmd_bench(argv[1:])
            return 0
        command = next((a for a in argv if not a.startswith("-")), None)
        args = vars(build_parser(commands=(command,)).parse_args(argv))
        _run(args.pop("command"), args)
    except UsageError as err:
        print(f"switchkd: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SwitchKDTrainer: on-policy distillation with SWITCH on top of ``transformers.Trainer``."""

from __future__ import annotations

import logging
import os
import random
from collections import defaultdict

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..decoding.generator import SwitchGenerator
from ..ops.spec import SwitchPolicy
from .checkpoints import check_output_dir, clear_marker, latest_complete, mark_complete, remove_previous_checkpoints
from .config import SwitchKDConfig
from .data import DistillCollator, as_distill_dataset, pack_batch, teacher_hidden_at_labels
from .losses import plain_lm_head, sequence_cross_entropy, sequence_kd_loss, sequence_linear_kd_loss
from .models import (
    apply_peft,
    base_model,
    check_output_rows,
    check_vocabularies,
    load_model,
    load_tokenizer,
)

logger = logging.getLogger(__name__)

STATE_FILE = "switchkd_state_rank{rank}.pt"


class SwitchKDTrainer(Trainer):
    """Distils ``model`` (the student) from a frozen ``teacher_model``.

    Each step takes the batch's prompts, gets responses from the configured source (generated under
    ``no_grad`` by one reused :class:`SwitchGenerator`), runs both models on ``prompt + response`` and
    minimises the KD loss on the response tokens (the mean over sequences of each sequence's token
    mean, so the loss does not depend on how a global batch is split across processes), plus
    ``ce_weight`` times cross-entropy when the responses come from the data. Logs ``kd_loss``,
    ``gen_divergence`` (JSD at generated tokens, nats in [0, ln 2]) and ``teacher_share`` through the
    Trainer's logging; an ``eval_dataset`` is scored by the KD loss on its responses (``eval_loss``).

    ``train_dataset``/``eval_dataset``: a :class:`DistillDataset`, or rows it accepts (e.g. a ``datasets.Dataset``
    with a ``messages`` column), tokenised with ``processing_class``.

    TRL ``GKDTrainer`` names: ``model`` and ``teacher_model`` (``teacher=`` is the same) are models or
    paths/ids loaded with ``args.model_init_kwargs`` / ``args.teacher_model_init_kwargs``; ``peft_config``
    (a ``peft`` config, e.g. ``LoraConfig``) trains and saves only adapter weights. Teacher and student
    share the tokenizer (``processing_class``; ``teacher_processing_class`` is compared with it token by
    token when given or when the teacher is a path); output rows past the tokenizer's length (padded
    embeddings) are left out of the loss and never sampled by SWITCH decoding (either model may have them;
    neither is resized).

    Example::

        args = SwitchKDConfig(output_dir="out", source="switch", max_steps=1000, per_device_train_batch_size=8)
        trainer = SwitchKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  processing_class=tokenizer)
        trainer.train()
    """

    def __init__(self, model=None, teacher_model=None, args: SwitchKDConfig | None = None, train_dataset=None,
                 data_collator=None, *, teacher=None, peft_config=None, teacher_processing_class=None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, **kwargs):
        if not isinstance(args, SwitchKDConfig):
            raise TypeError(f"args must be a SwitchKDConfig, got {type(args).__name__}")
        if teacher is not None and teacher_model is not None:
            raise TypeError("pass the teacher once: teacher_model= (TRL's name) or teacher=")
        teacher_model = teacher_model if teacher_model is not None else teacher
        if model is None or teacher_model is None:
            raise TypeError("SwitchKDTrainer needs model (the student) and teacher_model")
        if kwargs.get("processing_class") is None and isinstance(model, (str, os.PathLike)):
            kwargs["processing_class"] = load_tokenizer(model)
        if teacher_processing_class is None and isinstance(teacher_model, (str, os.PathLike)):
            teacher_processing_class = load_tokenizer(teacher_model)
        student = load_model(model, args.model_init_kwargs, name="model")
        teacher_model = load_model(teacher_model, args.teacher_model_init_kwargs, name="teacher_model")
        self.vocab_size = self._check_models(teacher_model, student, kwargs["processing_class"],
                                             teacher_processing_class)
        if peft_config is not None:
            student = apply_peft(student, peft_config)
        train_dataset = as_distill_dataset(train_dataset, kwargs["processing_class"], "train_dataset")
        if kwargs.get("eval_dataset") is not None:
            kwargs["eval_dataset"] = as_distill_dataset(kwargs["eval_dataset"], kwargs["processing_class"],
                                                        "eval_dataset")
        super().__init__(model=student, args=args, train_dataset=train_dataset,
                         data_collator=data_collator or DistillCollator(), **kwargs)
        tokenizer = self.processing_class
        self.eos_token_id = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or 0)
        self.teacher = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.generator: SwitchGenerator | None = None
        self.replay: list[tuple[list[int], list[int]]] = []
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._checked_hidden = False
        self._fused_linear_ok: bool | None = None

    @staticmethod
    def _check_models(teacher, student, tokenizer, teacher_tokenizer) -> int | None:
        """The tokenizer's length (None without a tokenizer); refuses different tokenizers or too few rows."""
        if tokenizer is not None and teacher_tokenizer is not None:
            check_vocabularies(teacher_tokenizer, tokenizer)
        vocab = len(tokenizer) if tokenizer is not None else None
        student_rows = check_output_rows(student, vocab, "student")
        teacher_rows = check_output_rows(teacher, vocab, "teacher")
        if teacher_rows != student_rows and vocab is None:
            raise ValueError(f"teacher and student have {teacher_rows} and {student_rows} output rows: pass the "
                             "tokenizer (processing_class) to tell real tokens from padded rows")
        return vocab  # decoding and the loss use the first `vocab` columns: padded rows are never touched

    # ------------------------------------------------------------------------------------ sources
    def _step_rng(self, index: torch.Tensor) -> random.Random:
        """A generator that depends only on (seed, step, first example): resume-proof and rank-proof."""
        return random.Random(f"{self.args.seed}/{self.state.global_step}/{int(index[0])}")

    def _source(self, rng: random.Random) -> str:
        args = self.args
        if args.lmbda < 1.0 and rng.random() >= args.lmbda:
            return "teacher" if args.seq_kd else "dataset"
        if args.source != "adaptive":
            return args.source
        ramp = max(1.0, args.adaptive_warmup_ratio * max(self.state.max_steps, 1))
        if rng.random() >= args.adaptive_max_prob * min(1.0, self.state.global_step / ramp):
            return "dataset"
        return "replay" if self.replay and rng.random() < args.replay_ratio else "student"

    def _generate(self, model, prompts, index, policy: SwitchPolicy):
        if self.generator is None:
            student = base_model(self.accelerator.unwrap_model(model))
            self.generator = SwitchGenerator(self.teacher, student, block_size=self.args.block_size,
                                             vocab_size=self.vocab_size)  # padded rows are never sampled
        span = len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else 1 << 32
        keys = (index + self.state.global_step * span).tolist()  # unique per example and step, any world size
        out = self.generator.generate(prompts, policy=policy, max_new_tokens=self.args.max_new_tokens,
                                      temperature=self.args.gen_temperature, eos_token_id=self.eos_token_id,
                                      seed=self.args.seed, draft_len=self.args.draft_len, row_keys=keys,
                                      return_teacher_hidden=self._reuse_teacher_states())
        self._metrics["teacher_share"].append(out.teacher_share)
        divergence = out.divergence[~out.divergence.isnan()]
        if divergence.numel():
            self._metrics["gen_divergence"].append(float(divergence.mean()))
        return out.responses, out.teacher_hidden

    def _reuse_teacher_states(self) -> bool:
        """``reuse_teacher_states`` and a teacher whose logits are a bias-free linear map of its last hidden state."""
        return self.args.reuse_teacher_states and plain_lm_head(self.teacher) is not None

    def _responses(self, model, inputs):
        """(prompts, responses, from the dataset, the teacher's hidden states at the responses or None)."""
        prompts, index = inputs["prompt_ids"], inputs["index"].cpu()
        rng = self._step_rng(index)
        source = self._source(rng)
        self._metrics["from_dataset"].append(float(source == "dataset"))
        if source == "dataset":
            return prompts, inputs["response_ids"], True, None
        if source == "replay":
            picked = [self.replay[rng.randrange(len(self.replay))] for _ in prompts]
            return [list(p) for p, _ in picked], [list(r) for _, r in picked], False, None
        policy = {"student": SwitchPolicy("never"), "teacher": SwitchPolicy("always")}.get(
            source, self.args.switch_policy())
        responses, teacher_hidden = self._generate(model, prompts, index, policy)
        if self.args.source == "adaptive":
            self.replay = (self.replay + list(zip(prompts, responses, strict=True)))[-self.args.replay_size:]
        return prompts, responses, False, teacher_hidden

    # ---------------------------------------------------------------------------------- sequences
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Produces this step's sequences (generated under ``no_grad``, with the teacher's hidden states when they
        are reused), then the Trainer's own step on them."""
        with torch.no_grad():
            prompts, responses, from_dataset, teacher_hidden = self._responses(model, inputs)
        batch = pack_batch(prompts, responses, self.pad_token_id, self.args.device)
        if teacher_hidden is not None and all(responses):  # an empty response is packed as one pad: no state for it
            batch["teacher_hidden"] = teacher_hidden_at_labels(teacher_hidden, [len(r) for r in responses],
                                                               batch["labels"][:, 1:])
        return super().training_step(model, {**batch, "from_dataset": from_dataset}, num_items_in_batch)

    # --------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """KD loss (plus ``ce_weight`` x cross-entropy on dataset responses) of a packed batch.

        Batches that were not packed by :meth:`training_step` (evaluation) use the data's responses.
        """
        if "input_ids" not in inputs:
            inputs = {**pack_batch(inputs["prompt_ids"], inputs["response_ids"], self.pad_token_id,
                                   self.args.device), "from_dataset": True}
        from_dataset = inputs["from_dataset"]
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        shifted = inputs["labels"][:, 1:]
        loss_args = {"kind": self.args.loss_kind, "alpha": self.args.kd_alpha, "beta": self.args.kd_beta,
                     "temperature": self.args.kd_temperature}
        needs_logits = from_dataset and self.args.ce_weight > 0
        teacher_hidden = inputs.get("teacher_hidden")  # [B, T - 1, H] at the label positions, from decoding
        if self._use_fused_linear(model) and not needs_logits:
            outputs, loss = self._fused_linear_loss(model, model_inputs, shifted, loss_args, teacher_hidden)
        else:
            with torch.no_grad():
                if teacher_hidden is None:
                    teacher_logits = self.teacher(**model_inputs).logits[:, :-1]
                else:
                    self._check_hidden_states(model_inputs)
                    teacher_logits = self.teacher.get_output_embeddings()(teacher_hidden)
            outputs = model(**model_inputs)
            student_logits, teacher_logits = (self._tokens_only(x) for x in (outputs.logits[:, :-1], teacher_logits))
            loss = sequence_kd_loss(student_logits, teacher_logits, shifted, **loss_args)
        if model.training:
            self._metrics["kd_loss"].append(float(loss.detach()))
        loss = self.args.kd_weight * loss
        if needs_logits:
            loss = loss + self.args.ce_weight * sequence_cross_entropy(student_logits, shifted)
        return (loss, outputs) if return_outputs else loss

    def _tokens_only(self, rows: torch.Tensor) -> torch.Tensor:
        """The logits of real tokens: columns of padded embedding rows stay out of the loss."""
        if self.vocab_size is None or rows.shape[-1] <= self.vocab_size:
            return rows
        return rows[..., : self.vocab_size]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the KD loss on the data's responses (``eval_loss``); no logits are gathered."""
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _use_fused_linear(self, model) -> bool:
        """``fused_linear_loss``: True/False as set; None = on CUDA when both LM heads are plain linear layers."""
        if self.args.fused_linear_loss is not None:
            return self.args.fused_linear_loss
        if self._fused_linear_ok is None:
            heads = (plain_lm_head(base_model(self.accelerator.unwrap_model(model))), plain_lm_head(self.teacher))
            self._fused_linear_ok = self.args.device.type == "cuda" and all(h is not None for h in heads)
        return self._fused_linear_ok

    def _fused_linear_loss(self, model, model_inputs, shifted, loss_args, teacher_hidden=None):
        """The same per-sequence KD loss from hidden states (the models compute one logit row each); the teacher's
        come from decoding when ``teacher_hidden`` is given, else from a teacher forward."""
        kwargs = {**model_inputs, "output_hidden_states": True, "logits_to_keep": 1}
        outputs, student = model(**kwargs), base_model(self.accelerator.unwrap_model(model))
        self._check_hidden_states(model_inputs, student, outputs)
        if teacher_hidden is None:
            with torch.no_grad():
                teacher_hidden = self.teacher(**kwargs).hidden_states[-1][:, :-1]
        student_head, teacher_head = (m.get_output_embeddings().weight[: self.vocab_size] for m in
                                      (student, self.teacher))
        loss = sequence_linear_kd_loss(outputs.hidden_states[-1][:, :-1], student_head, teacher_hidden, teacher_head,
                                       shifted, **loss_args)
        return outputs, loss

    def _check_hidden_states(self, model_inputs, student=None, student_outputs=None):
        """Once per run: the last hidden state of each model whose hidden states stand in for its logits (the teacher
        with the fused loss or reused decoding states; the ``student`` with the fused loss) is its LM head's input."""
        if self._checked_hidden:
            return
        with torch.no_grad():
            teacher_out = self.teacher(**model_inputs, output_hidden_states=True, logits_to_keep=1)
        checks = [("teacher", teacher_out, self.teacher, "reuse_teacher_states=False and fused_linear_loss=False")]
        if student is not None:
            checks.append(("student", student_outputs, student, "fused_linear_loss=False"))
        for name, out, m, switch in checks:
            h, head = out.hidden_states[-1][:, -1], m.get_output_embeddings().weight
            if not torch.allclose((h @ head.T).float(), out.logits[:, -1].float(), rtol=1e-3, atol=1e-3):
                raise ValueError(f"the {name}'s last hidden state is not its LM head's input (a final projection, "
                                 f"soft-capping or bias?): set {switch}")
        self._checked_hidden = True

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for name, values in self._metrics.items():
            if values:
                logs[name] = sum(values) / len(values)
        self._metrics.clear()
        super().log(logs, start_time)

    # --------------------------------------------------------------------- checkpoint and resume
    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint of
        ``output_dir`` (see :mod:`.checkpoints`). Without it, an ``output_dir`` holding checkpoints of another
        run is refused unless ``overwrite_output_dir`` (then those checkpoints are removed first)."""
        output_dir = self.args.output_dir
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self.latest_checkpoint()
        elif not resume_from_checkpoint and self.args.save_strategy != "no":
            check_output_dir(output_dir, resume=False, overwrite=self.args.overwrite_output_dir, any_file=False)
            if self.args.overwrite_output_dir and self.args.should_save:
                for folder in remove_previous_checkpoints(output_dir):
                    logger.warning("overwrite_output_dir: removed %s of an earlier run", folder)
            self.accelerator.wait_for_everyone()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def latest_checkpoint(self) -> str:
        """The newest complete checkpoint of ``output_dir`` (incomplete ones skipped, with a warning)."""
        found, skipped = latest_complete(self.args.output_dir)
        for folder in skipped:
            logger.warning("skipping %s: incomplete (interrupted during its save?)", folder)
        if found is None:
            raise ValueError(f"no complete checkpoint in {self.args.output_dir!r} to resume from")
        logger.warning("resuming from %s", found)
        return str(found)

    def _state_path(self, checkpoint_dir) -> str:
        return os.path.join(checkpoint_dir, STATE_FILE.format(rank=self.args.process_index))

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint plus the replay buffer, then the completeness marker, written last once
        every process has saved."""
        checkpoint = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            clear_marker(checkpoint)
        os.makedirs(checkpoint, exist_ok=True)
        torch.save({"replay": self.replay}, self._state_path(checkpoint))
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_complete(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = self._state_path(resume_from_checkpoint)
        if os.path.isfile(path):
            self.replay = torch.load(path)["replay"]


"""Run by test_trainer.py under `torch.distributed.run`: a few SWITCH steps, then the final weights.

Usage: ddp_train.py OUTPUT_DIR PER_DEVICE_BATCH (the global batch is PER_DEVICE_BATCH x processes).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))  # tasks (the char tokenizer)
from switchkd import SwitchKDConfig, SwitchKDTrainer  # noqa: E402
from switchkd.training.data import DistillDataset  # noqa: E402

from models import REVERSE_ROWS, char_gpt2, char_tokenizer  # noqa: E402

out, batch = Path(sys.argv[1]), int(sys.argv[2])
tokenizer = char_tokenizer()
args = SwitchKDConfig(output_dir=str(out), max_steps=6, per_device_train_batch_size=batch, learning_rate=3e-3,
                      save_strategy="no", report_to=[], seed=3, use_cpu=True, ddp_backend="gloo", max_new_tokens=8,
                      tau0=0.3, decay=0.05, disable_tqdm=True, source="switch")
dataset = DistillDataset(REVERSE_ROWS, tokenizer, max_prompt_tokens=32, max_length=64)
trainer = SwitchKDTrainer(model=char_gpt2(1, 32, seed=2), teacher=char_gpt2(2, 64, seed=1), args=args,
                          train_dataset=dataset, processing_class=tokenizer)
trainer.train()
if trainer.is_world_process_zero():
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}, out / "weights.pt")
    (out / "log.json").write_text(json.dumps({"steps": trainer.state.global_step}))
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()  # a live gloo process group can abort the interpreter at exit

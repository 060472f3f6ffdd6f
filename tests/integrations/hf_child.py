"""A tiny Hugging Face Trainer run for the tests: GPT-2 built from a config (no hub), synthetic data.

python hf_child.py OUTPUT_DIR [--steps 30] [--kill-at STEP] [--kill-in trainer|ckptdb] [--out weights.pt]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from ckptdb.hf import CatalogCallback, last_checkpoint

p = argparse.ArgumentParser()
p.add_argument("output_dir")
p.add_argument("--steps", type=int, default=30)
p.add_argument("--kill-at", type=int, default=-1)
p.add_argument("--kill-in", choices=["trainer", "ckptdb"], default="trainer")
p.add_argument("--out", default="")
a = p.parse_args()


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 64, (n, 16), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if a.kill_at >= 0 and a.kill_in == "trainer":  # SIGKILL while the Trainer writes checkpoint-N (model written)
    original = Trainer._save_rng_state

    def rng_then_die(self, output_dir):
        if self.state.global_step == a.kill_at:
            die()
        return original(self, output_dir)

    Trainer._save_rng_state = rng_then_die
elif a.kill_at >= 0:  # SIGKILL while ckptdb hashes the directory (row pending)
    import ckptdb.hf as hf

    original_hash = hf._hash_tree

    def hash_then_die(d, algorithm, *, fsync):
        if d.name == f"checkpoint-{a.kill_at}":
            die()
        return original_hash(d, algorithm, fsync=fsync)

    hf._hash_tree = hash_then_die

config = GPT2Config(
    vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)
torch.manual_seed(0)
model = GPT2LMHeadModel(config)
args = TrainingArguments(
    output_dir=a.output_dir,
    max_steps=a.steps,
    per_device_train_batch_size=4,
    learning_rate=3e-3,
    lr_scheduler_type="linear",
    save_strategy="steps",
    save_steps=5,
    eval_strategy="steps",
    eval_steps=5,
    metric_for_best_model="eval_loss",
    load_best_model_at_end=True,
    logging_steps=5,
    report_to=[],
    seed=0,
    data_seed=0,
    use_cpu=True,
    disable_tqdm=True,
    dataloader_num_workers=0,
)
trainer = Trainer(
    model=model,
    args=args,
    train_dataset=Tokens(64, 1),
    eval_dataset=Tokens(8, 2),
    callbacks=[CatalogCallback(keep_last=1, keep_best=2)],
)
resume = last_checkpoint(a.output_dir)
print(f"RESUME {resume}", flush=True)
trainer.train(resume_from_checkpoint=resume)
print(f"RESULT global_step={trainer.state.global_step} best={trainer.state.best_model_checkpoint}", flush=True)
if a.out:  # the weights at the last step (load_best_model_at_end swapped the model for the best one)
    final = torch.load
    from safetensors.torch import load_file

    sd = load_file(os.path.join(a.output_dir, f"checkpoint-{a.steps}", "model.safetensors"))
    torch.save(sd, a.out)

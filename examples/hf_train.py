"""ckptdb + Hugging Face Trainer: train, get SIGKILLed while saving, resume from last_checkpoint().

    python examples/hf_train.py                 # the whole demo (about a minute on a CPU)
    python examples/hf_train.py --worker DIR [--kill-at STEP]

A one-layer GPT-2 built from a config (no download) on random tokens. The ckptdb lines are the
import, ``callbacks=[CatalogCallback(...)]`` and ``resume_from_checkpoint=last_checkpoint(...)``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from ckptdb.hf import CatalogCallback, last_checkpoint


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.x = torch.randint(0, 128, (n, 32), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def worker(output_dir: str, kill_at: int) -> None:
    if kill_at >= 0:  # demo only: die while the Trainer writes checkpoint-<kill_at>
        save_rng = Trainer._save_rng_state

        def save_or_die(self, out):
            if self.state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return save_rng(self, out)

        Trainer._save_rng_state = save_or_die

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=60,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        save_steps=10,
        eval_strategy="steps",
        eval_steps=10,
        logging_steps=10,
        metric_for_best_model="eval_loss",
        load_best_model_at_end=True,
        save_total_limit=None,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomTokens(512, 1),
        eval_dataset=RandomTokens(32, 2),
        callbacks=[CatalogCallback(keep_last=2, keep_best=2)],
    )
    resume = last_checkpoint(output_dir)  # None when nothing is committed
    print(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", metavar="DIR")
    p.add_argument("--kill-at", type=int, default=-1)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.kill_at)
        return
    d = Path("demo-out/hf")
    shutil.rmtree(d, ignore_errors=True)
    me = [sys.executable, __file__, "--worker", str(d)]
    print("== training; SIGKILL while the Trainer writes checkpoint-40")
    print("   exit status", subprocess.run([*me, "--kill-at", "40"]).returncode)
    print("== same command again: resumes from the newest committed checkpoint")
    subprocess.run(me, check=True)
    subprocess.run([sys.executable, "-m", "ckptdb.cli", "ls", "--dir", str(d), str(d.resolve())], check=True)


if __name__ == "__main__":
    main()

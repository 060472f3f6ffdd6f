"""ckptdb with FSDP2 on CPU (gloo): sharded checkpoints, a consolidated model, resume at any world size.

    torchrun --nproc-per-node 2 examples/train_distributed.py --checkpoint-dir /tmp/ckpt-dist
    python examples/train_distributed.py --nproc 2 --checkpoint-dir /tmp/ckpt-dist   # same, without torchrun

Run it again with another ``--nproc-per-node`` (1, 4, ...): it resumes from the newest committed
checkpoint, resharded to the new world size. Every rank writes and hashes its own shard; rank 0
alone talks to the catalog and commits each checkpoint in one transaction (docs/distributed.md).
The last step also writes ``model.pt``, the full model, which loads in a plain process::

    FileCheckpointManager("/tmp/ckpt-dist").load_checkpoint(step)["model"]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ckptdb import CheckpointNotFoundError, FileCheckpointManager, KeepLast


def train(checkpoint_dir: Path, steps: int, every: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    # gang= takes the ProcessGroup as it is; only rank 0 opens the catalog
    manager = FileCheckpointManager(checkpoint_dir, gang=dist.group.WORLD, retention=KeepLast(2))

    start = 0
    model_sd, optim_sd = get_state_dict(model, optimizer)  # DTensors shaped for *this* world size
    try:
        # the catalog decides the step (rank 0 asks, every rank agrees); DCP reshards in place
        start, state = manager.load_last_checkpoint(sharded_state={"model": model_sd, "optimizer": optim_sd})
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        if rank == 0:
            print(f"resumed from step {start} (saved at world size {state['world_size']}, now {world})", flush=True)
    except CheckpointNotFoundError:
        if rank == 0:
            print("no checkpoint yet: starting from scratch", flush=True)

    g = torch.Generator().manual_seed(1234 + rank)
    w_true = torch.randn(16, 1, generator=torch.Generator().manual_seed(0))
    for step in range(start + 1, steps + 1):
        x = torch.randn(32, 16, generator=g)
        loss = nn.functional.mse_loss(model(x), x @ w_true)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            manager.begin_checkpoint(step)
            manager.save_state(  # DTensor values go through torch.distributed.checkpoint into sharded/
                {"model": model_sd, "optimizer": optim_sd, "world_size": world, "rank": rank}
            )
            if step == steps:
                manager.save_consolidated_fsdp_model(model)  # model.pt, loadable without a process group
            manager.save_score(loss.item(), metric="train_loss")
            manager.commit_checkpoint()
            kept = manager.get_step_numbers()  # collective, like every manager call: all ranks make it
            if rank == 0:
                print(f"step {step}: loss {loss.item():.4f}, committed; kept {kept}", flush=True)


def _init_and_train(rank: int, world: int, init_file: str, args: argparse.Namespace) -> None:
    # a bounded timeout: a rank that dies or hangs makes the others fail instead of waiting forever
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        train(args.checkpoint_dir, args.steps, args.every)
        dist.barrier()  # no rank tears gloo down while another still has a collective in flight
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints-distributed"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2, help="without torchrun: how many ranks to spawn")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        try:
            train(args.checkpoint_dir, args.steps, args.every)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        mp.spawn(_init_and_train, args=(args.nproc, init_file, args), nprocs=args.nproc)


if __name__ == "__main__":
    main()

"""One rank of a 2-rank gloo job writing DCP-sharded state (a DTensor sharded over both ranks) to S3.

    python -m tests.s3.child_dcp RANK WORLD INIT_FILE BUCKET PREFIX TOKEN OUT_JSON

Credentials and endpoint come from the AWS_* environment. Writes its records as JSON to OUT_JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from ckptdb.storage.objectstore import ObjectStore
from ckptdb.storage.s3client import MIN_PART_SIZE
from ckptdb.storage.store import open_store


def main() -> None:
    rank, world, init_file, bucket, prefix, token, out = sys.argv[1:8]
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=int(rank), world_size=int(world), timeout=timedelta(seconds=60)
    )
    mesh = init_device_mesh("cpu", (int(world),))
    full = torch.arange(MIN_PART_SIZE, dtype=torch.float32)  # 20 MiB: a multipart upload on each rank
    state = {"model": {"w": distribute_tensor(full, mesh, [Shard(0)])}, "step": 9}
    store = open_store(
        f"s3://{bucket}/{prefix}", storage_options={"part_size": MIN_PART_SIZE, "concurrency": 2}, object_store=True
    )
    assert isinstance(store, ObjectStore)
    w = store.open_writer(9, token, hash_algorithm="xxh3_128")
    w.open(create=rank == "0")
    recs = w.write_sharded(state, rank=int(rank), process_group=None if int(world) == 1 else dist.group.WORLD)
    with open(out, "w") as f:
        json.dump([dataclasses.asdict(r) for r in recs.values()], f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""A writer process for the S3 crash tests: one attempt, one complete file, then one slow multipart upload.

    python -m tests.s3.child_upload ENDPOINT BUCKET PREFIX STEP TOKEN

Credentials come from the AWS_* environment. Prints "model-done" once model.pt is complete, then
writes rank_0.pt in 5 MiB parts, slowly, and prints "done" (the test SIGKILLs it before).
"""

from __future__ import annotations

import os
import sys
import time

import torch

from ckptdb.storage.objectstore import ObjectStore
from ckptdb.storage.s3client import MIN_PART_SIZE
from ckptdb.storage.store import open_store


def main() -> None:
    endpoint, bucket, prefix, step, token = sys.argv[1:6]
    store = open_store(
        f"s3://{bucket}/{prefix}",
        storage_options={"endpoint_url": endpoint, "part_size": MIN_PART_SIZE, "concurrency": 2},
        object_store=True,
    )
    assert isinstance(store, ObjectStore)
    w = store.open_writer(int(step), token, hash_algorithm="xxh3_128")
    w.open()
    w.write_torch("model.pt", {"w": torch.randn(1000)})
    print("model-done", flush=True)
    slow = store.client.open_writer(bucket, store.key(w.directory, "rank_0.pt"))
    chunk = os.urandom(MIN_PART_SIZE)
    for _ in range(100):
        slow.write(chunk)
        time.sleep(0.2)
    slow.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()

"""The one way to get a run's :class:`~ckptdb.storage.store.Store` from its catalog row.

``runs.checkpoint_dir`` holds an absolute local path, or ``s3://bucket/prefix`` for a run on object
storage. Maintenance (``verify``, ``gc``, ``prune``, ``load_model``) opens the run's store here, with
credentials and endpoint from the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ...),
so that every protocol is written once against the Store interface.
"""

from __future__ import annotations

from pathlib import Path

from ckptdb.storage.location import ObjectLocation, parse_location
from ckptdb.storage.store import Store, open_store


def is_object_run(checkpoint_dir: str) -> bool:
    """Does this ``runs.checkpoint_dir`` name an object-store prefix (``s3://``)?"""
    return isinstance(parse_location(checkpoint_dir), ObjectLocation)


def run_store(checkpoint_dir: str, *, fsync: bool = True) -> Store:
    """The store of a run whose catalog row says ``checkpoint_dir``."""
    return open_store(checkpoint_dir, fsync=fsync, object_store=True)


def local_dir(checkpoint_dir: str) -> Path | None:
    """The local directory of a run, or None for an object-store run."""
    loc = parse_location(checkpoint_dir)
    return None if isinstance(loc, ObjectLocation) else loc.path


__all__ = ["is_object_run", "local_dir", "run_store"]

"""Pure path naming for a checkpoint directory (fairseq2's layout).

::

    checkpoint_dir/
      model.yaml
      catalog.db                     (default SQLite catalog)
      step_<N>/                      committed checkpoint
        model.pt  rank_0.pt  metadata.pt  score.txt  .ckptdb_token
      step_<N>.tmp-<token>/          a checkpoint being written (pending in the catalog)
      step_<N>.old-<token>/          the previous copy of step N while an overwrite commits
      step_<N>.trash-<token>/        a directory being removed
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ckptdb.errors import CheckpointCorruptError

CATALOG_FILE = "catalog.db"
MODEL_METADATA_FILE = "model.yaml"
TOKEN_FILE = ".ckptdb_token"
SCORE_FILE = "score.txt"
METADATA_FILE = "metadata.pt"

_STEP_RE = re.compile(r"^step_(\d+)$")
_WORK_RE = re.compile(r"^step_(\d+)\.(tmp|old|trash)(?:-([0-9a-f]+))?$")


def step_dir_name(step_nr: int) -> str:
    return f"step_{step_nr}"


def hf_dir_name(step_nr: int) -> str:
    """The Hugging Face Trainer's name for a step's directory (:mod:`ckptdb.hf` runs)."""
    return f"checkpoint-{step_nr}"


def tmp_dir_name(step_nr: int, token: str) -> str:
    return f"step_{step_nr}.tmp-{token}"


def old_dir_name(step_nr: int, token: str) -> str:
    return f"step_{step_nr}.old-{token}"


def trash_dir_name(step_nr: int, token: str) -> str:
    return f"step_{step_nr}.trash-{token}"


def suffix(tp_rank: int, tp_size: int) -> str:
    """fairseq2's tensor-parallel suffix: ``""`` when TP size is 1, else ``".<tp_rank>"``."""
    return "" if tp_size == 1 else f".{tp_rank}"


def model_file(tp_rank: int = 0, tp_size: int = 1) -> str:
    return f"model{suffix(tp_rank, tp_size)}.pt"


def replicated_file(tp_rank: int = 0, tp_size: int = 1) -> str:
    return f"replicated{suffix(tp_rank, tp_size)}.pt"


def rank_file(dp_rank: int = 0, tp_rank: int = 0, tp_size: int = 1) -> str:
    return f"rank_{dp_rank}{suffix(tp_rank, tp_size)}.pt"


def metadata_file(tp_rank: int = 0, tp_size: int = 1) -> str:
    return f"metadata{suffix(tp_rank, tp_size)}.pt"


def is_model_file(relpath: str) -> bool:
    """True for a model file (fairseq2: a top-level file whose stem starts with ``model``)."""
    name = relpath.rsplit("/", 1)[-1]
    return name.startswith("model") and "/" not in relpath


def kept_with_model(relpath: str) -> bool:
    """True for the files ``preserve_model=True`` keeps: the model files and ``score.txt``.

    fairseq2 unlinks only the other ``*.pt`` files, so a model-only step keeps its score (its
    asset provider ranks model-only steps by it).
    """
    return is_model_file(relpath) or relpath == SCORE_FILE


def parse_step_dir(name: str) -> int | None:
    """``step_<N>`` -> N; anything else -> None."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True, slots=True)
class WorkDir:
    """A ``step_<N>.<kind>-<token>`` directory: debris of an unfinished operation."""

    step_nr: int
    kind: str  # "tmp" | "old" | "trash"
    token: str | None


def parse_work_dir(name: str) -> WorkDir | None:
    m = _WORK_RE.match(name)
    if not m:
        return None
    return WorkDir(int(m.group(1)), m.group(2), m.group(3))


def resolve_inside(base: Path, relpath: str) -> Path:
    """Join ``relpath`` to ``base`` and refuse anything that escapes ``base``."""
    if not relpath or relpath.startswith(("/", "\\")) or "\x00" in relpath:
        raise ValueError(f"unsafe relative path {relpath!r}")
    parts = Path(relpath).parts
    if any(p in ("..", "") for p in parts):
        raise ValueError(f"unsafe relative path {relpath!r}")
    return base / relpath


# -- paths taken from catalog rows ---------------------------------------------------------------
#
# A row's ``directory`` and its shard ``path`` values are data anyone with write access to the
# catalog can change. Every place a catalog value becomes a filesystem path goes through these two
# functions; a value that would lead anywhere but inside ``checkpoint_dir/step_<N>/`` is refused
# with CheckpointCorruptError and never followed.


def step_path(checkpoint_dir: Path, step_nr: int, directory: str) -> Path:
    """The step directory a catalog row names, validated.

    It must be exactly :func:`step_dir_name` of the row's step, or the Hugging Face Trainer's
    ``checkpoint-<N>`` for the same step (runs of :mod:`ckptdb.hf`) — no ``..``, no absolute path,
    no other step — and an existing one must not be a symbolic link (ckptdb only ever creates real
    directories by rename).

    Raises:
        CheckpointCorruptError: the row's directory is anything else (nothing is touched).
    """
    expected = step_dir_name(step_nr)
    if directory == hf_dir_name(step_nr):
        expected = directory
    if directory != expected:
        raise CheckpointCorruptError(
            step_nr,
            directory,
            f"directory {expected!r} in the checkpoint directory",
            f"{directory!r} in the catalog row (refused, never followed)",
        )
    path = checkpoint_dir / expected
    if path.is_symlink():
        raise CheckpointCorruptError(
            step_nr, str(path), "a directory", f"a symbolic link to {os.readlink(path)!r} (refused, never followed)"
        )
    return path


def check_relpath(relpath: str, step_nr: int) -> str:
    """The lexical half of :func:`shard_path` (no filesystem access): no empty, absolute or ``..`` path.

    Raises:
        CheckpointCorruptError: naming the path.
    """
    try:
        resolve_inside(Path("."), relpath)
    except ValueError:
        raise CheckpointCorruptError(
            step_nr,
            relpath,
            "a relative path inside the step directory",
            f"{relpath!r} in the catalog's file list (refused, never followed)",
        ) from None
    return relpath


def shard_path(step_dir: Path, relpath: str, step_nr: int) -> Path:
    """``step_dir / relpath`` for a shard row's path, validated to stay inside ``step_dir``.

    Refuses an empty, absolute or ``..`` path, and one that resolves (through symbolic links)
    outside ``step_dir``.

    Raises:
        CheckpointCorruptError: the path leads outside the step directory (nothing is read).
    """
    path = step_dir / check_relpath(relpath, step_nr)
    base = step_dir.resolve()
    real = path.resolve()
    if real != base and base not in real.parents:
        raise CheckpointCorruptError(
            step_nr,
            str(path),
            "a file inside the step directory",
            f"a path resolving to {str(real)!r}, outside it (refused, never followed)",
        )
    return path

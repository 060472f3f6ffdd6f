"""One exception tree for everything ckptdb raises.

Every error derives from :class:`CheckpointError`; many also derive from the builtin a caller
would naturally catch (``LookupError``, ``ValueError``, ``FileExistsError``) so existing handlers
keep working.
"""

from __future__ import annotations


def _rebuild(cls: type[BaseException], args: tuple[object, ...], state: dict[str, object]) -> BaseException:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class CheckpointError(Exception):
    """Base for every ckptdb error.

    Errors pickle with their attributes, so a failure on one rank can be re-raised, as the same
    type, on every rank.
    """

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class CheckpointNotFoundError(CheckpointError, LookupError):
    """The requested checkpoint (or any checkpoint at all) is not committed in the catalog."""

    def __init__(self, message: str, *, step_nr: int | None = None) -> None:
        super().__init__(message)
        self.step_nr = step_nr


class InvalidOperationError(CheckpointError, RuntimeError):
    """A call made in the wrong order (begin twice, save or commit without begin, ...)."""


class InvalidArgumentError(CheckpointError, ValueError):
    """An argument ckptdb refuses: negative step, unsafe run name, unsaveable state value, ..."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint already exists for the step (pass ``overwrite=True`` to replace it)."""

    def __init__(self, message: str, *, step_nr: int) -> None:
        super().__init__(message)
        self.step_nr = step_nr


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file does not match the size or digest the catalog recorded for it."""

    def __init__(self, step_nr: int, path: str, expected: str, actual: str, *, missing: bool = False) -> None:
        what = "is missing" if missing else "does not match the catalog"
        super().__init__(f"checkpoint step {step_nr}: file {path!r} {what} (expected {expected}, found {actual})")
        self.step_nr = step_nr
        self.path = path
        self.expected = expected
        self.actual = actual
        self.missing = missing


class CheckpointDirUnavailableError(CheckpointError):
    """A run's checkpoint directory is absent, or holds none of the run's committed checkpoints.

    Typically an unmounted filesystem (an empty mount point). ``gc`` and ``verify`` refuse to judge
    files they cannot see, instead of marking every checkpoint ``missing``.
    """

    def __init__(self, message: str, *, run: str, checkpoint_dir: str) -> None:
        super().__init__(message)
        self.run = run
        self.checkpoint_dir = checkpoint_dir


class UnsafeCheckpointFileError(CheckpointError):
    """A checkpoint file holds objects that ``torch.load(weights_only=True)`` refuses to build."""


class CatalogError(CheckpointError):
    """The catalog database refused or failed an operation."""


class CatalogUnavailableError(CatalogError, ConnectionError):
    """The catalog database cannot be reached (bad URL, server down, file not writable)."""


class SchemaOutOfDateError(CatalogError):
    """The catalog's schema is older (or newer) than this ckptdb; the message names the command."""


class ConcurrentModificationError(CatalogError):
    """Another process changed the same checkpoint first (e.g. two writers of one step)."""


class UnsupportedCheckpointError(CheckpointError, NotImplementedError):
    """A checkpoint ckptdb cannot read this way yet (e.g. a sharded model for ``load_model``)."""


class RankLostError(CheckpointError):
    """A collective with the other ranks failed: a peer died, or did not arrive within the timeout.

    With gloo a SIGKILLed peer makes the others fail at once ("connection closed by peer"); a
    peer that hangs is detected after the process group's timeout (``init_process_group(
    timeout=...)``), which bounds how long any ckptdb collective can wait. See docs/distributed.md.
    """


class RemoteRankError(CheckpointError):
    """Another rank failed with an error that cannot cross process boundaries (it does not pickle).

    Raised on every rank in its place, carrying its type name and message, so that every rank
    still raises the same type with the same message.
    """


class ObjectStoreError(CheckpointError, OSError):
    """An object store (S3 API) refused or failed a request after its retries.

    The message says what to do (wrong credentials, missing bucket, unreachable endpoint);
    ``bucket``, ``key`` and the server's error ``code`` are attributes.
    """

    def __init__(self, message: str, *, bucket: str = "", key: str | None = None, code: str = "") -> None:
        super().__init__(message)
        self.bucket = bucket
        self.key = key
        self.code = code

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ObjectExistsError(ObjectStoreError, FileExistsError):
    """A conditional write (``If-None-Match: *``) found an object at the key: nothing was replaced."""

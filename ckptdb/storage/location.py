"""Where a run's payload lives: a local directory or an object-store prefix, parsed from one string.

Every entry point that accepts a checkpoint directory (``FileCheckpointManager``, ``ckptdb import``,
``--dir``, :func:`ckptdb.loader.load_model`, ...) parses it here, once:

=========================== =====================================================================
``/data/run7``, ``run7``,   a local directory (:class:`LocalLocation`; ``~`` expanded, made
``~/run7``, a ``PathLike``  absolute)
``file:///data/run7``       the same local directory (only ``file:///absolute`` or
                            ``file://localhost/absolute``: no other host)
``s3://bucket/prefix``      an object-store prefix (:class:`ObjectLocation`); needs a shared
                            catalog (``catalog=`` / ``CKPTDB_URL``): see :func:`require_shared_catalog`
anything else ``<x>://...`` refused with :class:`~ckptdb.errors.InvalidArgumentError` naming the
                            scheme: a URL is never taken for a local path (``s3:`` in the cwd)
=========================== =====================================================================

Nothing here touches the filesystem or the network, and nothing imports the catalog.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from ckptdb.errors import InvalidArgumentError

SUPPORTED_FORMS = "a local path, file:///absolute/path, or s3://bucket/prefix"
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# S3's bucket naming rules (3-63 characters: lowercase letters, digits, dots, hyphens), plus the
# underscores and capitals some S3-compatible servers (Ceph RGW, old regions) still allow
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{1,61}[A-Za-z0-9]$")


@dataclass(frozen=True, slots=True)
class LocalLocation:
    """A checkpoint directory on a (local or network-mounted) filesystem."""

    path: Path  # absolute, ``~`` expanded, symbolic links resolved
    kind: Literal["local"] = "local"

    @property
    def is_local(self) -> bool:
        return True

    @property
    def url(self) -> str:
        """The identity recorded in the catalog (``runs.checkpoint_dir``): the absolute path."""
        return str(self.path)

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True, slots=True)
class ObjectLocation:
    """A run's prefix in an S3-compatible bucket: objects are ``<prefix>/step_<N>.<token>/<relpath>``."""

    bucket: str
    prefix: str  # without leading or trailing '/'; "" for the bucket's root
    scheme: str = "s3"
    kind: Literal["object"] = "object"

    @property
    def is_local(self) -> bool:
        return False

    @property
    def url(self) -> str:
        """The identity recorded in the catalog (``runs.checkpoint_dir``): ``s3://bucket/prefix``."""
        return f"{self.scheme}://{self.bucket}/{self.prefix}" if self.prefix else f"{self.scheme}://{self.bucket}"

    def key(self, *parts: str) -> str:
        """The object key of ``parts`` joined under the prefix (``key("step_3.ab12", "model.pt")``)."""
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return self.url


Location = LocalLocation | ObjectLocation


def url_scheme(text: str) -> str | None:
    """The scheme of ``text`` when it is written as a URL (``<scheme>://...``), else None (a path: a
    name with a colon, ``run:1``, is a valid directory name)."""
    m = _SCHEME_RE.match(text)
    if m is None or len(m.group(1)) == 1:
        return None
    return m.group(1).lower()


def parse_location(value: str | os.PathLike[str] | Location, *, what: str = "checkpoint_dir") -> Location:
    """Parse a checkpoint directory given as a path or a URL (see the module docstring).

    Args:
        value: the path or URL; a parsed location is returned as it is.
        what: how error messages name the argument (``checkpoint_dir``, ``--dir``, ...).

    Raises:
        InvalidArgumentError: an empty value, an unsupported scheme (the message names it and the
            supported forms), a ``file://`` URL naming another host, an ``s3://`` URL without a
            valid bucket.
    """
    if isinstance(value, LocalLocation | ObjectLocation):
        return value
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a path or a URL string, not {type(value).__name__}")
    if not value.strip():
        raise InvalidArgumentError(f"{what} is empty: give {SUPPORTED_FORMS}")
    scheme = url_scheme(value)
    if scheme is None:
        return LocalLocation(Path(value).expanduser().resolve())
    if scheme == "file":
        return _parse_file_url(value, what)
    if scheme == "s3":
        return _parse_s3_url(value, what)
    raise InvalidArgumentError(
        f"{what} {value!r}: the URL scheme {scheme + '://'!r} is not supported; give {SUPPORTED_FORMS}"
    )


def _parse_file_url(value: str, what: str) -> LocalLocation:
    parts = urlsplit(value)
    if parts.netloc not in ("", "localhost"):
        raise InvalidArgumentError(
            f"{what} {value!r}: a file:// URL names a local path (file:///absolute/path), not host {parts.netloc!r}"
        )
    if parts.query or parts.fragment:
        raise InvalidArgumentError(f"{what} {value!r}: a file:// URL takes no query or fragment")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise InvalidArgumentError(f"{what} {value!r}: a file:// URL needs an absolute path (file:///absolute/path)")
    return LocalLocation(Path(path).resolve())


def _parse_s3_url(value: str, what: str) -> ObjectLocation:
    parts = urlsplit(value)
    bucket = parts.netloc
    if not bucket:
        raise InvalidArgumentError(f"{what} {value!r}: an object-store URL needs a bucket: s3://bucket/prefix")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise InvalidArgumentError(f"{what} {value!r}: {bucket!r} is not a valid bucket name")
    if parts.query or parts.fragment:
        raise InvalidArgumentError(
            f"{what} {value!r}: an s3:// URL takes no query or fragment (endpoint and credentials come from the "
            "AWS environment or storage_options=)"
        )
    prefix = parts.path.strip("/")
    segments = prefix.split("/") if prefix else []
    if any(s in ("", ".", "..") for s in segments):
        raise InvalidArgumentError(f"{what} {value!r}: the prefix {prefix!r} has an empty, '.' or '..' segment")
    return ObjectLocation(bucket, prefix)


def require_shared_catalog(location: Location, catalog_url: str | None) -> None:
    """Refuse an object-store location without a shared catalog (``catalog=`` or ``CKPTDB_URL``).

    A local checkpoint directory defaults to a SQLite catalog inside it; an object-store run has no
    local directory to hold one, and a catalog on one machine's disk would hide the run from every
    other machine that writes or reads the bucket.

    Raises:
        InvalidArgumentError: ``location`` is an object-store location and ``catalog_url`` is empty.
    """
    if isinstance(location, ObjectLocation) and not catalog_url:
        raise InvalidArgumentError(
            f"checkpoint_dir {location.url!r} is in object storage, which needs a shared catalog: pass "
            "catalog='postgresql+psycopg://...' (CLI: --url) or set CKPTDB_URL (there is no local "
            "default catalog for an object-store run)"
        )


def local_path(value: str | os.PathLike[str] | Location, *, what: str = "checkpoint_dir", by: str = "this") -> Path:
    """:func:`parse_location` for entry points that only work on a local directory (trainer integrations).

    Raises:
        InvalidArgumentError: as :func:`parse_location`, and for an object-store URL (naming ``by``).
    """
    loc = parse_location(value, what=what)
    if isinstance(loc, ObjectLocation):
        raise InvalidArgumentError(
            f"{what} {loc.url!r}: {by} works on a local or network-mounted directory only, not on object storage"
        )
    return loc.path


__all__ = [
    "SUPPORTED_FORMS",
    "LocalLocation",
    "Location",
    "ObjectLocation",
    "local_path",
    "parse_location",
    "require_shared_catalog",
    "url_scheme",
]

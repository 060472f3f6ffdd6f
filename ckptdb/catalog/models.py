"""The catalog's tables. Their names, columns and state strings are a public interface
(docs/schema.md); change them only through a migration."""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class State(str, enum.Enum):
    """A checkpoint's state, stored as its readable value."""

    PENDING = "pending"  # being written; never loaded
    COMMITTED = "committed"  # complete, hashed, loadable
    ABORTED = "aborted"  # never committed: abort_checkpoint(), a failed save, or a dead writer
    SUPERSEDED = "superseded"  # replaced by a newer commit of the same step (overwrite=True)
    DELETING = "deleting"  # deletion in progress (files may be partly gone)
    DELETED = "deleted"  # files removed (model kept when model_preserved)
    CORRUPT = "corrupt"  # files present but altered (size or digest mismatch)
    MISSING = "missing"  # files gone behind the catalog's back


# Read-only views created by migration 0002 (docs/sql.md); not ORM tables, so autogenerate skips them.
VIEW_NAMES = ("checkpoint_summary", "checkpoint_scores", "run_summary")

LIVE_STATES = (State.COMMITTED, State.DELETING, State.CORRUPT, State.MISSING)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on both backends (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _state_enum() -> Enum:
    return Enum(
        State,
        name="checkpoint_state",
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    checkpoint_dir: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    model_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    model_metadata_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    checkpoints: Mapped[list[Checkpoint]] = relationship(back_populates="run")


# the predicate of ix_checkpoints_retention_candidates (revision 0006), as each dialect renders
# retention_sql.candidate(): a committed checkpoint, or the model-only leftover of a deletion
RETENTION_CANDIDATE_SQLITE = "state IN ('committed', 'deleted') AND (state = 'committed' OR model_preserved IS 1)"
RETENTION_CANDIDATE_PG = "state IN ('committed', 'deleted') AND (state = 'committed' OR model_preserved IS true)"


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (
        # At most one live (committed / deleting / corrupt / missing) row per step of a run,
        # and at most one pending writer per step.
        Index(
            "uq_checkpoints_live_step",
            "run_id",
            "step_nr",
            unique=True,
            sqlite_where=text("state IN ('committed', 'deleting', 'corrupt', 'missing')"),
            postgresql_where=text("state IN ('committed', 'deleting', 'corrupt', 'missing')"),
        ),
        Index(
            "uq_checkpoints_pending_step",
            "run_id",
            "step_nr",
            unique=True,
            sqlite_where=text("state = 'pending'"),
            postgresql_where=text("state = 'pending'"),
        ),
        Index("ix_checkpoints_run_id_state_step_nr", "run_id", "state", "step_nr"),
        # cross-run questions ("every corrupt checkpoint", "commits in the last day"): revision 0002
        Index("ix_checkpoints_state_committed_at", "state", "committed_at"),
        # a run's newest commit (run_summary.last_committed_at) from one index entry: revision 0008
        Index("ix_checkpoints_run_id_state_committed_at", "run_id", "state", "committed_at"),
        # retention's candidates of a run, covering (revision 0006); the predicate is the text
        # retention_sql.candidate() renders, so the planners can prove the query implies it
        Index(
            "ix_checkpoints_retention_candidates",
            "run_id",
            "step_nr",
            "state",
            "model_preserved",
            sqlite_where=text(RETENTION_CANDIDATE_SQLITE),
            postgresql_where=text(RETENTION_CANDIDATE_PG),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step_nr: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[State] = mapped_column(_state_enum())
    token: Mapped[str] = mapped_column(String(32), unique=True)
    directory: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    committed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    state_changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    delete_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    model_preserved: Mapped[bool] = mapped_column(Boolean, default=False)
    writer_host: Mapped[str] = mapped_column(String(255))
    writer_pid: Mapped[int] = mapped_column(Integer)
    writer_start_time: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The kernel boot and pid namespace the writer's pid belongs to (revision 0004; NULL before).
    writer_boot_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    writer_pid_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ckptdb_version: Mapped[str] = mapped_column(String(64))
    torch_version: Mapped[str] = mapped_column(String(64))
    python_version: Mapped[str] = mapped_column(String(64))
    world_size: Mapped[int] = mapped_column(Integer, default=1)
    hash_algorithm: Mapped[str] = mapped_column(String(16))
    total_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    file_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    verify_result: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # What the save cost, in wall-clock seconds (set at commit; revision 0003). NULL on rows
    # committed before the revision and on imported checkpoints.
    stage_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    write_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    sync_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    commit_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)

    run: Mapped[Run] = relationship(back_populates="checkpoints")
    shards: Mapped[list[Shard]] = relationship(back_populates="checkpoint", cascade="all, delete-orphan")
    scores: Mapped[list[Score]] = relationship(back_populates="checkpoint", cascade="all, delete-orphan")


class Shard(Base):
    __tablename__ = "shards"
    __table_args__ = (UniqueConstraint("checkpoint_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    hash_algorithm: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str] = mapped_column(String(128))
    rank: Mapped[int] = mapped_column(Integer, default=0)
    kind: Mapped[str] = mapped_column(String(32), default="state")
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # the object store's full-object checksum ("crc32c:<base64>"); NULL on a filesystem
    remote_checksum: Mapped[str | None] = mapped_column(String(80), nullable=True)

    checkpoint: Mapped[Checkpoint] = relationship(back_populates="shards")


class Score(Base):
    __tablename__ = "scores"
    __table_args__ = (
        UniqueConstraint("checkpoint_id", "metric"),
        Index("ix_scores_metric_value", "metric", "value"),
        # keep_best's per-checkpoint score lookup without a table read (revision 0006)
        Index("ix_scores_checkpoint_id_metric_value", "checkpoint_id", "metric", "value"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"))
    metric: Mapped[str] = mapped_column(String(255))
    # NULL when the score is NaN or infinite (kept in raw_value); such scores are never "best".
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    raw_value: Mapped[str] = mapped_column(String(64))

    checkpoint: Mapped[Checkpoint] = relationship(back_populates="scores")


class CheckpointEvent(Base):
    """The state history of every checkpoint: who moved it, when, from what, to what and why."""

    __tablename__ = "checkpoint_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)


class Pin(Base):
    """A label that protects one step of a run from retention (``pin(step_nr, label)``)."""

    __tablename__ = "pins"
    __table_args__ = (
        UniqueConstraint("run_id", "label"),
        Index("ix_pins_run_id_step_nr", "run_id", "step_nr"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step_nr: Mapped[int] = mapped_column(BigInteger)
    label: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

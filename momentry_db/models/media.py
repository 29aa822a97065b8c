"""Isolated media tables: videos and everything derived from them.

One copy of each table lives in every environment schema; foreign keys here
point only at other isolated tables.
"""

from __future__ import annotations

import datetime as dt
from uuid import UUID
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, REAL
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.expression import false

from momentry_db.models.base import Isolated, Timestamps

EMPTY_JSON = text("'{}'::jsonb")


class Video(Timestamps, Isolated):
    """One ingested video file and its processing status."""

    __tablename__ = "videos"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    uuid: Mapped[UUID] = mapped_column(
        Uuid, unique=True, nullable=False, server_default=text("gen_random_uuid()")
    )
    title: Mapped[str | None] = mapped_column(Text)
    source_path: Mapped[str] = mapped_column(Text, nullable=False)
    content_hash: Mapped[str | None] = mapped_column(Text, index=True)
    mime_type: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    duration_seconds: Mapped[float | None] = mapped_column(Double)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    fps: Mapped[float | None] = mapped_column(Double)
    codec: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=text("'pending'"), index=True
    )
    error: Mapped[str | None] = mapped_column(Text)
    processed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=EMPTY_JSON
    )


class Chunk(Timestamps, Isolated):
    """A time segment of a video, the unit of search and understanding."""

    __tablename__ = "chunks"
    __table_args__ = (UniqueConstraint("video_id", "sequence"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    video_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("videos.id", ondelete="CASCADE"), nullable=False, index=True
    )
    sequence: Mapped[int] = mapped_column(Integer, nullable=False)
    start_seconds: Mapped[float] = mapped_column(Double, nullable=False)
    end_seconds: Mapped[float] = mapped_column(Double, nullable=False)
    transcript: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=text("'pending'"), index=True
    )
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=EMPTY_JSON
    )


class PreChunk(Timestamps, Isolated):
    """A candidate segment (scene cut, speech span) before it becomes a chunk."""

    __tablename__ = "pre_chunks"
    __table_args__ = (UniqueConstraint("video_id", "source", "sequence"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    video_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("videos.id", ondelete="CASCADE"), nullable=False, index=True
    )
    source: Mapped[str] = mapped_column(Text, nullable=False)
    sequence: Mapped[int] = mapped_column(Integer, nullable=False)
    start_seconds: Mapped[float] = mapped_column(Double, nullable=False)
    end_seconds: Mapped[float] = mapped_column(Double, nullable=False)
    score: Mapped[float | None] = mapped_column(Double)
    is_merged: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())
    payload: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=EMPTY_JSON
    )


class ChunkVector(Timestamps, Isolated):
    """An embedding of one chunk produced by one model (plain real[], no pgvector)."""

    __tablename__ = "chunk_vectors"
    __table_args__ = (
        UniqueConstraint("chunk_id", "model"),
        CheckConstraint("cardinality(embedding) = dim", name="dim_matches"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    chunk_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("chunks.id", ondelete="CASCADE"), nullable=False, index=True
    )
    model: Mapped[str] = mapped_column(Text, nullable=False, index=True)
    dim: Mapped[int] = mapped_column(Integer, nullable=False)
    embedding: Mapped[list[float]] = mapped_column(ARRAY(REAL), nullable=False)


class Frame(Timestamps, Isolated):
    """A frame extracted from a video (keyframe or sample) and where its image is."""

    __tablename__ = "frames"
    __table_args__ = (UniqueConstraint("video_id", "frame_number"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    video_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("videos.id", ondelete="CASCADE"), nullable=False, index=True
    )
    frame_number: Mapped[int] = mapped_column(BigInteger, nullable=False)
    timestamp_seconds: Mapped[float] = mapped_column(Double, nullable=False)
    image_path: Mapped[str | None] = mapped_column(Text)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    is_keyframe: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())
    phash: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=EMPTY_JSON
    )


class ProcessorResult(Timestamps, Isolated):
    """The output of one processor (ASR, OCR, scenes, ...) run over one video."""

    __tablename__ = "processor_results"
    __table_args__ = (Index(None, "video_id", "processor"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    video_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("videos.id", ondelete="CASCADE"), nullable=False, index=True
    )
    processor: Mapped[str] = mapped_column(Text, nullable=False)
    processor_version: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=text("'pending'"), index=True
    )
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[int | None] = mapped_column(BigInteger)


class FileRegistry(Timestamps, Isolated):
    """A file the service manages on disk (source, derived artefact, export)."""

    __tablename__ = "file_registry"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    path: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    video_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("videos.id", ondelete="SET NULL"), index=True
    )
    kind: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'source'"))
    sha256: Mapped[str | None] = mapped_column(Text, index=True)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    mime_type: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=text("'active'"), index=True
    )
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=EMPTY_JSON
    )


class FileLifecycle(Isolated):
    """One lifecycle event of a registered file (created, moved, archived, deleted)."""

    __tablename__ = "file_lifecycle"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    file_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("file_registry.id", ondelete="CASCADE"), nullable=False, index=True
    )
    event: Mapped[str] = mapped_column(Text, nullable=False)
    from_path: Mapped[str | None] = mapped_column(Text)
    to_path: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=EMPTY_JSON
    )
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), index=True
    )

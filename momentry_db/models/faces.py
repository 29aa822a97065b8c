"""Isolated face tables: detections in frames, clusters, identities, matches.

One copy of each table lives in every environment schema; foreign keys here
point only at other isolated tables.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Identity,
    Integer,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, REAL
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.expression import false

from momentry_db.models.base import Isolated, Timestamps

EMPTY_JSON = text("'{}'::jsonb")


class FaceIdentity(Timestamps, Isolated):
    """A known person that face detections can be recognised as."""

    __tablename__ = "face_identities"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    uuid: Mapped[UUID] = mapped_column(
        Uuid, unique=True, nullable=False, server_default=text("gen_random_uuid()")
    )
    name: Mapped[str] = mapped_column(Text, nullable=False, index=True)
    notes: Mapped[str | None] = mapped_column(Text)
    is_confirmed: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=EMPTY_JSON
    )


class FaceCluster(Timestamps, Isolated):
    """A group of similar face detections, optionally assigned to an identity."""

    __tablename__ = "face_clusters"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    identity_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("face_identities.id", ondelete="SET NULL"), index=True
    )
    label: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(Text)
    dim: Mapped[int | None] = mapped_column(Integer)
    centroid: Mapped[list[float] | None] = mapped_column(ARRAY(REAL))
    member_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))


class FaceDetection(Timestamps, Isolated):
    """One face found in a frame of a video: box, confidence and embedding."""

    __tablename__ = "face_detections"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    video_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("videos.id", ondelete="CASCADE"), nullable=False, index=True
    )
    frame_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("frames.id", ondelete="CASCADE"), index=True
    )
    cluster_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("face_clusters.id", ondelete="SET NULL"), index=True
    )
    timestamp_seconds: Mapped[float] = mapped_column(Double, nullable=False)
    bbox_x: Mapped[float] = mapped_column(REAL, nullable=False)
    bbox_y: Mapped[float] = mapped_column(REAL, nullable=False)
    bbox_w: Mapped[float] = mapped_column(REAL, nullable=False)
    bbox_h: Mapped[float] = mapped_column(REAL, nullable=False)
    confidence: Mapped[float] = mapped_column(REAL, nullable=False)
    model: Mapped[str | None] = mapped_column(Text)
    dim: Mapped[int | None] = mapped_column(Integer)
    embedding: Mapped[list[float] | None] = mapped_column(ARRAY(REAL))
    thumbnail_path: Mapped[str | None] = mapped_column(Text)
    landmarks: Mapped[dict[str, Any] | None] = mapped_column(JSONB)


class FaceRecognitionResult(Timestamps, Isolated):
    """A match of one face detection against one identity, with its score."""

    __tablename__ = "face_recognition_results"
    __table_args__ = (UniqueConstraint("detection_id", "identity_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    detection_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("face_detections.id", ondelete="CASCADE"), nullable=False, index=True
    )
    identity_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("face_identities.id", ondelete="CASCADE"), nullable=False, index=True
    )
    similarity: Mapped[float] = mapped_column(REAL, nullable=False)
    model: Mapped[str | None] = mapped_column(Text)
    is_confirmed: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())

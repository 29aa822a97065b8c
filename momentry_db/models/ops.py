"""Shared operations tables: monitoring, backups, nodes and storage, in public.

Rows an environment owns are told apart by the ``environment`` column; foreign
keys point only at other shared tables.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    SmallInteger,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.expression import true

from momentry_db.models.base import Shared, Timestamps

EMPTY_JSON = text("'{}'::jsonb")
PROD = text("'prod'")


class MonitorService(Timestamps, Shared):
    """A service whose health is checked (HTTP endpoint, TCP port, process)."""

    __tablename__ = "monitor_services"
    __table_args__ = (UniqueConstraint("environment", "name"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    environment: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=PROD, index=True
    )
    name: Mapped[str] = mapped_column(Text, nullable=False)
    kind: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'http'"))
    endpoint: Mapped[str | None] = mapped_column(Text)
    expected_status: Mapped[int | None] = mapped_column(SmallInteger)
    check_interval_seconds: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default=text("60")
    )
    timeout_seconds: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default=text("10")
    )
    is_enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=true())
    config: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=EMPTY_JSON
    )


class MonitorHealthCheck(Shared):
    """The outcome of one health check of a monitored service (append-only)."""

    __tablename__ = "monitor_health_checks"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    service_id: Mapped[int] = mapped_column(
        BigInteger,
        ForeignKey("monitor_services.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    )
    checked_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), index=True
    )
    status: Mapped[str] = mapped_column(Text, nullable=False)
    response_time_ms: Mapped[int | None] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(SmallInteger)
    error: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=EMPTY_JSON
    )
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class MonitorWorkflow(Timestamps, Shared):
    """An n8n workflow watched for runs, failures and idleness."""

    __tablename__ = "monitor_workflows"
    __table_args__ = (UniqueConstraint("environment", "n8n_workflow_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    environment: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=PROD, index=True
    )
    n8n_workflow_id: Mapped[str] = mapped_column(Text, nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=true())
    idle_threshold_minutes: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default=text("1440")
    )
    last_run_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_success_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_status: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=EMPTY_JSON
    )


class MonitorAlert(Timestamps, Shared):
    """An alert raised by monitoring, about a service or a workflow."""

    __tablename__ = "monitor_alerts"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    environment: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=PROD, index=True
    )
    service_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("monitor_services.id", ondelete="SET NULL"), index=True
    )
    monitor_workflow_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("monitor_workflows.id", ondelete="SET NULL"), index=True
    )
    severity: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=text("'warning'")
    )
    status: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=text("'open'"), index=True
    )
    title: Mapped[str] = mapped_column(Text, nullable=False)
    message: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=EMPTY_JSON
    )
    fired_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), index=True
    )
    acknowledged_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    acknowledged_by: Mapped[str | None] = mapped_column(Text)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class BackupJob(Timestamps, Shared):
    """A configured backup (what to back up, where, how often, how long to keep)."""

    __tablename__ = "backup_jobs"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    environment: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=PROD, index=True
    )
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    source: Mapped[str | None] = mapped_column(Text)
    destination: Mapped[str | None] = mapped_column(Text)
    schedule: Mapped[str | None] = mapped_column(Text)
    retention_days: Mapped[int | None] = mapped_column(Integer)
    is_enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=true())
    config: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=EMPTY_JSON
    )


class BackupRun(Timestamps, Shared):
    """One execution of a backup job and its result."""

    __tablename__ = "backup_runs"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    job_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("backup_jobs.id", ondelete="CASCADE"), nullable=False, index=True
    )
    status: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=text("'pending'"), index=True
    )
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    location: Mapped[str | None] = mapped_column(Text)
    checksum: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=EMPTY_JSON
    )


class NodeRegistry(Timestamps, Shared):
    """A machine (server, GPU worker) that runs part of Momentry."""

    __tablename__ = "node_registry"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    uuid: Mapped[UUID] = mapped_column(
        Uuid, unique=True, nullable=False, server_default=text("gen_random_uuid()")
    )
    hostname: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    role: Mapped[str | None] = mapped_column(Text)
    address: Mapped[str | None] = mapped_column(Text)
    version: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=text("'unknown'"), index=True
    )
    last_seen_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    capabilities: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=EMPTY_JSON
    )


class NodeHeartbeat(Shared):
    """One heartbeat from a node with its load figures (append-only)."""

    __tablename__ = "node_heartbeats"
    __table_args__ = (Index(None, "node_id", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    node_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("node_registry.id", ondelete="CASCADE"), nullable=False, index=True
    )
    status: Mapped[str | None] = mapped_column(Text)
    cpu_percent: Mapped[float | None] = mapped_column(Double)
    memory_percent: Mapped[float | None] = mapped_column(Double)
    disk_percent: Mapped[float | None] = mapped_column(Double)
    load_avg_1m: Mapped[float | None] = mapped_column(Double)
    details: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=EMPTY_JSON
    )
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class PythonBaseline(Timestamps, Shared):
    """The expected Python interpreter and package set of a node, for drift checks."""

    __tablename__ = "python_baselines"
    __table_args__ = (UniqueConstraint("environment", "name"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    environment: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=PROD, index=True
    )
    node_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("node_registry.id", ondelete="SET NULL"), index=True
    )
    name: Mapped[str] = mapped_column(Text, nullable=False)
    python_version: Mapped[str] = mapped_column(Text, nullable=False)
    packages: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=EMPTY_JSON
    )
    lock_hash: Mapped[str | None] = mapped_column(Text, index=True)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=true())


class StorageVolume(Timestamps, Shared):
    """A disk, mount or bucket whose usage is tracked."""

    __tablename__ = "storage_volumes"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    node_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("node_registry.id", ondelete="SET NULL"), index=True
    )
    kind: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'local'"))
    mount_path: Mapped[str | None] = mapped_column(Text)
    capacity_bytes: Mapped[int | None] = mapped_column(BigInteger)
    warn_percent: Mapped[int] = mapped_column(
        SmallInteger, nullable=False, server_default=text("80")
    )
    critical_percent: Mapped[int] = mapped_column(
        SmallInteger, nullable=False, server_default=text("90")
    )
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=true())


class StorageUsageSnapshot(Shared):
    """A point-in-time reading of a volume's usage (append-only)."""

    __tablename__ = "storage_usage_snapshots"
    __table_args__ = (Index(None, "volume_id", "captured_at"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    volume_id: Mapped[int] = mapped_column(
        BigInteger,
        ForeignKey("storage_volumes.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    )
    captured_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    used_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    free_bytes: Mapped[int | None] = mapped_column(BigInteger)
    file_count: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

"""Shared auth tables: API keys and external tokens, stored once in public.

Secrets are kept only as hashes. Rows an environment owns are told apart by
the ``environment`` column; foreign keys point only at other shared tables.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Identity,
    Integer,
    SmallInteger,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import INET, JSONB
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.expression import false, true

from momentry_db.models.base import Shared, Timestamps

EMPTY_JSON = text("'{}'::jsonb")
EMPTY_JSON_ARRAY = text("'[]'::jsonb")
PROD = text("'prod'")


class ApiKey(Timestamps, Shared):
    """An API key for Momentry Core, owned by one environment (hash only)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    environment: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=PROD, index=True
    )
    name: Mapped[str] = mapped_column(Text, nullable=False)
    key_prefix: Mapped[str | None] = mapped_column(Text, index=True)
    key_hash: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    scopes: Mapped[list[str]] = mapped_column(
        JSONB, nullable=False, server_default=EMPTY_JSON_ARRAY
    )
    owner: Mapped[str | None] = mapped_column(Text)
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=true())
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class ApiKeyAuditLog(Shared):
    """One audited use or change of an API key (append-only)."""

    __tablename__ = "api_key_audit_log"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    api_key_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("api_keys.id", ondelete="SET NULL"), index=True
    )
    environment: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=PROD, index=True
    )
    action: Mapped[str] = mapped_column(Text, nullable=False)
    method: Mapped[str | None] = mapped_column(Text)
    path: Mapped[str | None] = mapped_column(Text)
    status_code: Mapped[int | None] = mapped_column(SmallInteger)
    ip_address: Mapped[str | None] = mapped_column(INET)
    user_agent: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=EMPTY_JSON
    )
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), index=True
    )


class ApiKeyAnomaly(Timestamps, Shared):
    """Suspicious behaviour noticed on an API key (burst, new IP, failures)."""

    __tablename__ = "api_key_anomalies"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    api_key_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("api_keys.id", ondelete="CASCADE"), nullable=False, index=True
    )
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    severity: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=text("'warning'")
    )
    description: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=EMPTY_JSON
    )
    detected_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), index=True
    )
    is_resolved: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())
    resolved_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class GiteaToken(Timestamps, Shared):
    """An access token for Gitea, owned by one environment (hash only)."""

    __tablename__ = "gitea_tokens"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    environment: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=PROD, index=True
    )
    name: Mapped[str] = mapped_column(Text, nullable=False)
    gitea_user: Mapped[str | None] = mapped_column(Text)
    token_prefix: Mapped[str | None] = mapped_column(Text)
    token_hash: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    scopes: Mapped[list[str]] = mapped_column(
        JSONB, nullable=False, server_default=EMPTY_JSON_ARRAY
    )
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=true())
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class N8nApiKey(Timestamps, Shared):
    """An API key for the n8n workflow server, owned by one environment (hash only)."""

    __tablename__ = "n8n_api_keys"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    environment: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=PROD, index=True
    )
    name: Mapped[str] = mapped_column(Text, nullable=False)
    key_prefix: Mapped[str | None] = mapped_column(Text)
    key_hash: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=true())
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

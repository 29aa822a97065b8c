"""Declarative base: every model says whether it is isolated or shared.

A model derives from :class:`Isolated` (one copy per environment schema) or
:class:`Shared` (lives in ``public`` only). The marking is written into the
table's ``info`` so that env.py, autogenerate and verification read one source.
"""

from __future__ import annotations

import datetime as dt
from enum import Enum
from typing import Any

from sqlalchemy import DateTime, MetaData, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCOPE_KEY = "momentry_scope"

# Deterministic constraint and index names: they must come out identical in
# every environment schema, or structure comparisons would report false drift.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Scope(str, Enum):
    """Where a table lives: in every environment schema, or in public only."""

    ISOLATED = "isolated"
    SHARED = "shared"


class Base(DeclarativeBase):
    """Common base; derive models from Isolated or Shared, never from Base."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        table = cls.__dict__.get("__table__")
        if table is None:  # abstract classes and mixins
            return
        if issubclass(cls, Isolated):
            table.info[SCOPE_KEY] = Scope.ISOLATED
        elif issubclass(cls, Shared):
            table.info[SCOPE_KEY] = Scope.SHARED
        else:
            raise TypeError(f"model {cls.__name__} must derive from Isolated or Shared")


class Isolated(Base):
    """A table copied into every environment's schema (prod's public, dev, ...)."""

    __abstract__ = True


class Shared(Base):
    """A table that exists once, in public, for all environments."""

    __abstract__ = True


class Timestamps:
    """created_at / updated_at columns, set by the database."""

    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )

"""All Momentry models: importing this package registers every table and view."""

from __future__ import annotations

from momentry_db.models import auth, faces, media, ops  # noqa: F401  (register tables)
from momentry_db.models.base import SCOPE_KEY, Base, Isolated, Scope, Shared
from momentry_db.models.views import VIEWS

metadata = Base.metadata

__all__ = ["Base", "Isolated", "Shared", "Scope", "SCOPE_KEY", "metadata", "VIEWS"]

"""Helpers that revision files use to say which operations are isolated or shared."""

from __future__ import annotations


def on_primary() -> bool:
    """Tell whether this run targets prod's public schema, where shared operations apply."""
    from alembic import op

    target = op.get_context().opts.get("momentry_target")
    if target is None:
        raise RuntimeError("revisions must run through migrations/env.py (momentry-db or alembic)")
    return bool(target.primary)

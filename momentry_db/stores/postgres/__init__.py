"""PostgreSQL: per-schema Alembic runs.

Each target (one environment's schema) gets its own connection, an advisory lock
keyed by its schema, a search_path holding that schema only, its own
``alembic_version`` table and one transaction. Isolated operations run in every
target; shared operations only in public (see :mod:`momentry_db.revision`).

The package is split along its jobs; this module names what the rest of momentry-db uses.
"""

from __future__ import annotations

from .connection import (
    APP_NAME,
    CONNECT_TIMEOUT_S,
    LOCK_CLASS,
    REPO_ROOT,
    SCRIPT_LOCATION,
    STORE,
    UNMANAGED,
    PgTarget,
    SchemaRun,
    acquire_lock,
    connect,
    create_engine,
    held_locks,
    label,
    lock_holder,
    lock_sql,
    quote_ident,
    quote_literal,
    release_lock,
    session_settings_sql,
    set_search_path,
    tables_with_rows,
)
from .fanout import current_versions, read_states, upgrade_all, upgrade_chunk, upgrade_compiled, upgrade_many
from .history import HISTORY_DDL, HISTORY_INSERT, HISTORY_TABLE, history, record_failure
from .manage import clone_tables, compare_live, drop_schema, preflight_drop
from .planning import (
    alembic_config,
    check_revisions,
    current_heads,
    downgrade,
    has_revision,
    heads,
    load_script,
    offline_sql,
    plan,
    plan_at,
    run_results,
    stamp,
    unmanaged_tables,
    upgrade,
)
from .runner import (
    failure,
    refuse_unconfirmed_downgrade,
    run_env,
    targets_for,
    targets_from_x_args,
    to_head,
)

__all__ = [
    "APP_NAME",
    "CONNECT_TIMEOUT_S",
    "HISTORY_DDL",
    "HISTORY_INSERT",
    "HISTORY_TABLE",
    "LOCK_CLASS",
    "REPO_ROOT",
    "SCRIPT_LOCATION",
    "STORE",
    "UNMANAGED",
    "PgTarget",
    "SchemaRun",
    "acquire_lock",
    "alembic_config",
    "check_revisions",
    "clone_tables",
    "compare_live",
    "connect",
    "create_engine",
    "current_heads",
    "current_versions",
    "read_states",
    "plan_at",
    "downgrade",
    "drop_schema",
    "failure",
    "has_revision",
    "heads",
    "held_locks",
    "history",
    "label",
    "load_script",
    "lock_holder",
    "lock_sql",
    "offline_sql",
    "plan",
    "preflight_drop",
    "quote_ident",
    "quote_literal",
    "record_failure",
    "refuse_unconfirmed_downgrade",
    "release_lock",
    "run_env",
    "run_results",
    "session_settings_sql",
    "set_search_path",
    "stamp",
    "tables_with_rows",
    "targets_for",
    "targets_from_x_args",
    "to_head",
    "unmanaged_tables",
    "upgrade",
    "upgrade_all",
    "upgrade_chunk",
    "upgrade_compiled",
    "upgrade_many",
]

"""Alembic configuration, revision checks, plans, offline SQL, upgrade, downgrade and stamp."""

from __future__ import annotations

import io
from dataclasses import replace
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import (
    ConfigError,
    StoreError,
)
from ...plan import Step, TargetPlan

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy import MetaData
    from sqlalchemy.engine import Connection

    from ...settings import Project

from .connection import SCRIPT_LOCATION, STORE, UNMANAGED, PgTarget, SchemaRun, connect, label

#: Where env.py leaves what each run did, by schema: Alembic's command functions return nothing.
RESULTS = "momentry_results"

# --- library calls --------------------------------------------------------------------------


def alembic_config(targets: Sequence[PgTarget], *, project: Project | None = None,
                   script_location: Path | None = None, output: io.StringIO | None = None,
                   metadata: MetaData | None = None) -> Config:
    """An Alembic Config that runs our env.py against the given targets."""
    from alembic.config import Config

    cfg = Config(output_buffer=output)
    cfg.set_main_option("script_location", str(script_location or SCRIPT_LOCATION))
    cfg.set_main_option("version_path_separator", "os")
    cfg.attributes["momentry_targets"] = list(targets)
    cfg.attributes["momentry_project"] = project
    cfg.attributes["momentry_metadata"] = metadata
    cfg.attributes[RESULTS] = {}
    return cfg


def run_results(cfg: Config) -> dict[str, SchemaRun]:
    """What the runs of an Alembic command on ``cfg`` did, by schema (a target not run is absent)."""
    return dict(cfg.attributes.get(RESULTS, {}))


def load_script(script_location: Path | None) -> Any:
    """The revision scripts, checked: each file loads, and they form one line from one base to one head.

    Loaded once per process while the files stay as they are (a run over many schemas plans each
    one; importing the revision files each time would cost more than the database's part).
    """
    from alembic.script import ScriptDirectory

    location = Path(script_location or SCRIPT_LOCATION).resolve()
    key = _files_key(location)
    cached = _LOADED.get(location)
    if cached is not None and cached[0] == key:
        return cached[1]
    script = ScriptDirectory(str(location))
    check_revisions(script)
    _LOADED[location] = (key, script)
    return script


_LOADED: dict[Path, tuple[tuple[tuple[str, int, int], ...], Any]] = {}


def _files_key(location: Path) -> tuple[tuple[str, int, int], ...]:
    """Every file under the script location, with its size and modification time: a change shows."""
    found = []
    for path in location.rglob("*"):
        if "__pycache__" in path.parts:
            continue
        try:
            st = path.stat()
        except OSError:
            continue
        found.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(found))


def heads(script_location: Path | None, cache: Path | None = None) -> tuple[str, ...]:
    """The head revisions of the revision files (loading them checks each file).

    With ``cache`` (a file in the state directory), the heads found are kept there with the size
    and modification time of every revision file and of momentry-db's own files; while none of
    those changed, the heads are read back without importing Alembic or a revision file, so a
    no-op run pays for neither. Any change, or an unreadable cache, loads and checks them again.
    """
    import json

    location = Path(script_location or SCRIPT_LOCATION).resolve()
    if cache is not None:
        key = [list(f) for f in _files_key(location) + _files_key(Path(__file__).resolve().parents[2])]
        try:
            kept = json.loads(cache.read_text())
        except (OSError, ValueError):
            kept = None
        if isinstance(kept, dict) and kept.get("key") == key and isinstance(kept.get("heads"), list):
            return tuple(str(h) for h in kept["heads"])
    found = tuple(sorted(load_script(script_location).get_heads()))
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            scratch = cache.with_suffix(".tmp")
            scratch.write_text(json.dumps({"key": key, "heads": list(found)}))
            scratch.replace(cache)
        except OSError:
            pass  # a read-only state directory only loses the shortcut
    return found


def has_revision(script_location: Path | None, revision: str) -> bool:
    """Whether ``revision`` is one of the revision files'."""
    from alembic.util import CommandError

    try:
        return load_script(script_location).get_revision(revision) is not None
    except CommandError:
        return False


def check_revisions(script: Any) -> None:
    """Refuse revision files that fail to import, and a history that is not one line, before any connection."""
    import warnings

    from alembic.util import to_tuple

    versions = Path(script.versions).resolve()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # alembic's own warnings; the checks below name the file
            loaded = list(script._load_revisions())  # imports every revision file, as alembic does
    except Exception as exc:  # noqa: BLE001 - any error a revision file raises at import
        raise ConfigError(f"revision file {_failed_file(exc, versions)} cannot be loaded: "
                          f"{type(exc).__name__}: {exc.msg if isinstance(exc, SyntaxError) else _first_line(exc)}; "
                          "fix or remove it") from None
    by_id: dict[str, Any] = {}
    for rev in loaded:
        if rev.revision in by_id:
            raise ConfigError(f"revision {rev.revision} is defined twice: {_shown_file(by_id[rev.revision].path)} "
                              f"and {_shown_file(rev.path)}; give one of them a new revision id")
        by_id[rev.revision] = rev
    referenced: set[str] = set()
    for rev in loaded:
        for down in to_tuple(rev.down_revision, default=()):
            if down not in by_id:
                raise ConfigError(f"revision file {_shown_file(rev.path)}: down_revision {down!r} is not a "
                                  "known revision; point it at the revision it follows")
            referenced.add(down)
    bases = sorted(_shown_file(r.path) for r in loaded if not to_tuple(r.down_revision, default=()))
    heads = sorted(_shown_file(r.path) for r in loaded if r.revision not in referenced)
    if len(bases) > 1:
        raise ConfigError(f"the revision history has {len(bases)} bases ({', '.join(bases)}); "
                          "each revision but the first needs a down_revision")
    if len(heads) > 1:
        raise ConfigError(f"the revision history has {len(heads)} heads ({', '.join(heads)}); "
                          "merge them (alembic merge heads) or point one at the other")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def _failed_file(exc: BaseException, versions: Path) -> str:
    """The revision file an import error came from: a SyntaxError names it, a traceback passes through it."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return _shown_file(exc.filename) + (f", line {exc.lineno}" if exc.lineno else "")
    import traceback

    inside = [f for f in traceback.extract_tb(exc.__traceback__)
              if Path(f.filename).resolve().is_relative_to(versions)]
    if inside:
        return f"{_shown_file(inside[-1].filename)}, line {inside[-1].lineno}"
    return f"in {_shown_file(versions)}"


def _shown_file(path: str | Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def current_heads(conn: Connection, schema: str) -> tuple[str, ...]:
    """The revisions recorded in a schema's alembic_version (empty when never migrated)."""
    from alembic.runtime.migration import MigrationContext

    ctx = MigrationContext.configure(conn, opts={"version_table_schema": schema})
    return tuple(sorted(ctx.get_current_heads()))


def plan(target: PgTarget, *, with_sql: bool = False, script_location: Path | None = None,
         project: Project | None = None) -> TargetPlan:
    """Where a target stands and which revisions are pending, optionally with their SQL."""
    load_script(script_location)  # a broken history stops before any connection
    unmanaged: list[str] = []
    with connect(target) as conn:
        # One snapshot for both reads, so a concurrent first run is seen whole or not at all.
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        current = current_heads(conn, target.schema)
        if not current:
            unmanaged = unmanaged_tables(conn, target.schema)
    found = plan_at(target, current, unmanaged, script_location=script_location)
    if with_sql and found.pending:
        sql = offline_sql(target, f"{current[0]}:head" if current else "head",
                          script_location=script_location, project=project)
        return replace(found, sql=sql)
    return found


def plan_at(target: PgTarget, current: tuple[str, ...], unmanaged: Sequence[str], *,
            script_location: Path | None = None) -> TargetPlan:
    """A target's plan from its recorded revisions and unmanaged tables, already read."""
    from alembic.util import CommandError

    script = load_script(script_location)
    notes: tuple[str, ...] = ()
    if unmanaged:
        notes = (f"{UNMANAGED}: {', '.join(unmanaged[:5])}"
                 + (f" and {len(unmanaged) - 5} more" if len(unmanaged) > 5 else ""),)
    head = tuple(sorted(script.get_heads()))
    try:
        revisions = list(script.iterate_revisions("heads", current[0] if current else "base"))
    except CommandError as exc:
        raise StoreError(STORE, label(target), "plan",
                         f"{exc}; is this checkout older than the database?") from None
    pending = tuple(Step(STORE, target.env.name, target.schema, r.revision, r.doc or "")
                    for r in reversed(revisions))
    return TargetPlan(STORE, target.env.name, target.schema, current, head, pending, None, notes, tuple(unmanaged))


def offline_sql(target: PgTarget, revision_range: str, *, script_location: Path | None = None,
                project: Project | None = None) -> str:
    """The SQL an upgrade would run, as Alembic's offline mode writes it (psql-ready)."""
    from alembic import command

    out = io.StringIO()
    command.upgrade(alembic_config([target], project=project, script_location=script_location,
                                   output=out), revision_range, sql=True)
    return out.getvalue()


def upgrade(target: PgTarget, revision: str = "head", *, script_location: Path | None = None,
            project: Project | None = None) -> list[str]:
    """Upgrade one target; return the revisions applied."""
    from alembic import command

    cfg = alembic_config([target], project=project, script_location=script_location)
    command.upgrade(cfg, revision)
    return list(run_results(cfg).get(target.schema, SchemaRun()).applied)


def downgrade(target: PgTarget, revision: str, *, script_location: Path | None = None,
              project: Project | None = None) -> list[str]:
    """Downgrade one target; return the revisions undone."""
    from alembic import command

    cfg = alembic_config([target], project=project, script_location=script_location)
    command.downgrade(cfg, revision)
    return list(run_results(cfg).get(target.schema, SchemaRun()).applied)


def stamp(target: PgTarget, revision: str = "head", *, script_location: Path | None = None,
          project: Project | None = None) -> None:
    """Record a revision as applied without running it."""
    from alembic import command

    command.stamp(alembic_config([target], project=project, script_location=script_location), revision)


def unmanaged_tables(conn: Connection, schema: str, meta: MetaData | None = None) -> list[str]:
    """Model tables that exist in a schema that has no alembic_version (created outside Alembic)."""
    import sqlalchemy as sa

    from ...models import metadata

    names = sorted((meta or metadata).tables)
    rows = conn.execute(sa.text(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = :s "
        "AND table_name = ANY(:names)"), {"s": schema, "names": names})
    return sorted(r[0] for r in rows)

"""Alembic configuration, revision checks, plans, offline SQL, upgrade, downgrade and stamp."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

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


class Scopes(NamedTuple):
    """The models' names by where they live (see ``momentry_db.tables``): the tables every schema holds,
    the tables and views only public holds, and the bookkeeping tables beside them."""

    isolated: frozenset[str]
    shared: frozenset[str]
    views: frozenset[str]
    bookkeeping: frozenset[str]

    @classmethod
    def of_models(cls) -> Scopes:
        """Read from the models (importing them, Alembic and alembic_utils)."""
        from ...tables import BOOKKEEPING_TABLES, isolated_tables, shared_tables, view_names

        return cls(isolated_tables(), shared_tables(), view_names(), BOOKKEEPING_TABLES)


class Rev(NamedTuple):
    """One revision of a path, as a compiled run records it."""

    revision: str
    doc: str


#: How a revision file asks whether it runs offline: one that does may do something else there, and a
#: compiled script (rendered offline) would take that branch.
_ONLINE_ONLY = re.compile(r"\b(is_offline_mode|as_sql)\b")


class Kept:
    """What a run needs of the revision files and the models, kept in a file of the state directory.

    The heads, the revision line (each revision's id and description), the models' names by scope and
    every compiled script rendered so far (see ``fanout.render_template``). They hold while the
    revision files, momentry-db's own files and the installed Alembic, SQLAlchemy, alembic_utils and
    psycopg stay as they are (the size and modification time of each): then a run that finds what it
    needs here loads no revision file and renders nothing, so neither Alembic nor the models are
    imported for it. Any change, or a file that cannot be read, and the revision files are loaded and
    checked again. Without a file (``None``), everything is worked out in the process and nothing is
    kept. The file is as trusted as the revision files: its scripts run as they are.
    """

    def __init__(self, file: Path | None, location: Path, key: list[Any] | None) -> None:
        self.file, self.location, self.key = file, location, key
        self.data: dict[str, Any] = {}
        if file is not None:
            import json

            try:
                kept = json.loads(file.read_text())
            except (OSError, ValueError):
                kept = None
            if isinstance(kept, dict) and kept.get("key") == key:
                self.data = kept

    @classmethod
    def open(cls, file: Path | None, script_location: Path | None) -> Kept:
        """The record for these revision files, as the state directory holds it now."""
        location = Path(script_location or SCRIPT_LOCATION).resolve()
        return cls(file, location, _kept_key(location) if file is not None else None)

    def heads(self) -> tuple[str, ...]:
        """The head revisions (loading the revision files, when they are not kept, checks each one)."""
        if not isinstance(self.data.get("heads"), list):
            self._learn()
        return tuple(str(h) for h in self.data["heads"])

    def path(self, start: tuple[str, ...]) -> list[Rev] | None:
        """The revisions from ``start`` (exclusive) to head, oldest first; None when the history is not
        one line or ``start`` is not in it (Alembic's own revision map answers then)."""
        rest = self._rest(start)
        return None if rest is None else [Rev(rev, doc) for rev, doc, _ in rest]

    def compilable(self, start: tuple[str, ...]) -> bool:
        """Whether the path from ``start`` may run compiled: no revision on it mentions offline mode, so
        none renders differently offline (such paths run through Alembic, schema by schema)."""
        rest = self._rest(start)
        return rest is not None and not any(online_only for _, _, online_only in rest)

    def _rest(self, start: tuple[str, ...]) -> list[list[Any]] | None:
        if "line" not in self.data:
            self._learn()
        line = self.data["line"]
        if line is None or len(start) > 1:
            return None
        ids = [r[0] for r in line]
        if start and start[0] not in ids:
            return None
        return line[ids.index(start[0]) + 1:] if start else line

    def tables(self) -> list[str]:
        """The models' table names."""
        scopes = self.scopes()
        return sorted(scopes.isolated | scopes.shared)

    def scopes(self) -> Scopes:
        """The models' names by scope (what a role is granted: see ``grants``)."""
        kept = self.data.get("scopes")
        if isinstance(kept, dict) and all(isinstance(kept.get(f), list) for f in Scopes._fields):
            return Scopes(*(frozenset(kept[f]) for f in Scopes._fields))
        found = Scopes.of_models()
        self.data["scopes"] = {f: sorted(getattr(found, f)) for f in Scopes._fields}
        self._save()
        return found

    def template(self, start: tuple[str, ...], primary: bool, render: Callable[[], str | None]) -> str | None:
        """The compiled script from ``start`` to head for public (``primary``) or any other schema:
        kept, or rendered now and kept (None: offline mode cannot express the path)."""
        templates = self.data.setdefault("templates", {})
        name = f"{'public' if primary else 'schema'}:{','.join(start)}"
        if name not in templates:
            templates[name] = render()
            self._save()
        body = templates[name]
        return body if isinstance(body, str) else None

    def _learn(self) -> None:
        """Load and check the revision files: the heads and, when the history is one line, that line."""
        from alembic.util import to_tuple

        script = load_script(self.location)
        self.data["heads"] = sorted(script.get_heads())
        revisions = list(reversed(list(script.iterate_revisions("heads", "base"))))
        linear = all(len(to_tuple(r.down_revision, default=())) <= 1 for r in revisions)
        self.data["line"] = [[r.revision, r.doc or "", _online_only(r.path)] for r in revisions] if linear else None
        self._save()

    def _save(self) -> None:
        if self.file is None:
            return
        import json
        import os

        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            scratch = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
            scratch.write_text(json.dumps({**self.data, "key": self.key}))
            scratch.replace(self.file)  # two runs at once: each writes a whole record, the last one stays
        except OSError:
            pass  # a read-only state directory only loses the shortcut


def _kept_key(location: Path) -> list[Any]:
    """What the kept record depends on: the revision files, momentry-db's own files and the libraries
    that render the SQL (found without importing them)."""
    import importlib.util
    import sys

    files = list(_files_key(location) + _files_key(Path(__file__).resolve().parents[2]))
    for name in ("alembic", "sqlalchemy", "alembic_utils", "psycopg"):
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        try:
            st = origin.stat() if origin is not None else None
        except OSError:
            st = None
        files.append((str(origin), st.st_size, st.st_mtime_ns) if st is not None else (name, 0, 0))
    return [list(f) for f in files] + [list(sys.version_info[:3])]


def _online_only(path: str) -> bool:
    try:
        text = Path(path).read_text()
    except OSError:
        return True
    return _ONLINE_ONLY.search(text) is not None


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
            script_location: Path | None = None, kept: Kept | None = None) -> TargetPlan:
    """A target's plan from its recorded revisions and unmanaged tables, already read (the revision
    line from ``kept`` when it has it)."""
    notes: tuple[str, ...] = ()
    if unmanaged:
        notes = (f"{UNMANAGED}: {', '.join(unmanaged[:5])}"
                 + (f" and {len(unmanaged) - 5} more" if len(unmanaged) > 5 else ""),)
    path = kept.path(current) if kept is not None else None
    if path is not None and kept is not None:
        head = kept.heads()
        pending = tuple(Step(STORE, target.env.name, target.schema, r.revision, r.doc) for r in path)
    else:
        from alembic.util import CommandError

        script = load_script(script_location)
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

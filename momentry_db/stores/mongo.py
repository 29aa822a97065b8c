"""MongoDB: pymongo-migrate modules applied to the environment's database.

pymongo-migrate supplies the module format, the graph and the state collection
(``pymongo_migrate`` in the environment's database, so its own CLI reads the same
state). This runner adds what it lacks: validation of the graph, an atomic lock
with a short lease that the live run renews, a plan read from the state collection, and a recorded failure.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..environments import Environment, Secret, scrub
from ..errors import ConfigError, LockTimeoutError, StoreError, StoreUnreachableError
from ..locks import HeldLock
from ..plan import Step, TargetPlan
from . import mongo_shape

if TYPE_CHECKING:
    from pymongo import MongoClient
    from pymongo.database import Database

STORE = "mongo"
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "mongo_migrations"
STATE_COLLECTION = "pymongo_migrate"  # pymongo-migrate's default
LOCK_COLLECTION = "momentry_migrate_lock"
HISTORY_COLLECTION = "momentry_migrate_history"
SHAPE_COLLECTION = mongo_shape.SHAPE_COLLECTION
BOOKKEEPING = (STATE_COLLECTION, LOCK_COLLECTION, HISTORY_COLLECTION, SHAPE_COLLECTION)
LOCK_ID = "migrate"
TIMEOUT_MS = 5000
# A live run renews its lease every third of it, so a dead run's lock is free within LOCK_LEASE.
LOCK_LEASE = dt.timedelta(seconds=30)


def unreachable_reason(exc: Exception, secrets: Iterable[str | Secret]) -> str:
    """Why a server could not be reached, in one line and without secrets.

    A server that accepts connections but never answers ends either as the monitor's "HOST: timed out"
    or as the selection's "No servers found yet", whichever of the two equal timeouts fires first;
    both mean the same thing and are reported as one.
    """
    reason = str(exc).split(",")[0].split("\n")[0].split(" (configured timeouts")[0]
    if reason.startswith("No servers found yet") or reason.endswith("timed out"):
        reason = f"no answer within {TIMEOUT_MS // 1000}s"
    return scrub(reason, secrets)


class Clock:
    """The time the migration lock reads: lease instants, the wait's deadline, and the pause between looks.

    ``clock`` below is the one in use; tests replace it to run a lease or a wait out without waiting.
    """

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


clock = Clock()


@dataclass(frozen=True)
class MongoMigration:
    """One migration module: its name, what it depends on, and its functions."""

    name: str
    dependencies: tuple[str, ...]
    description: str
    module: ModuleType = field(repr=False, compare=False)

    def upgrade(self, db: Database) -> None:
        self.module.upgrade(db)


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[MongoMigration]:
    """Load and validate every module, in pymongo-migrate's order (initial first)."""
    found: dict[str, MongoMigration] = {}
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("__"):
            continue
        module = _import(path)
        where = f"{directory.name}/{path.name}"
        deps = getattr(module, "dependencies", None)
        if not isinstance(deps, (list, tuple)) or not all(isinstance(d, str) for d in deps):
            raise ConfigError(f"{where}: needs a module-level `dependencies` list of migration names "
                              "([] for the first migration)")
        for fn in ("upgrade", "downgrade"):
            if not callable(getattr(module, fn, None)):
                raise ConfigError(f"{where}: needs a function {fn}(db)")
        if getattr(module, "name", path.stem) != path.stem:
            raise ConfigError(f"{where}: `name` must match the file name {path.stem!r}")
        doc = (module.__doc__ or "").strip().splitlines()
        found[path.stem] = MongoMigration(path.stem, tuple(deps), doc[0] if doc else "", module)
    return _ordered(found, directory.name)


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"momentry_db._mongo_migrations.{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken module is a configuration error, reported by file
        raise ConfigError(f"{path.parent.name}/{path.name}: cannot be imported: "
                          f"{type(exc).__name__}: {exc}") from None
    return module


def _ordered(found: dict[str, MongoMigration], where: str) -> list[MongoMigration]:
    """Check the graph (known dependencies, no cycle, one initial) and order it."""
    for m in found.values():
        for dep in m.dependencies:
            if dep not in found:
                raise ConfigError(f"{where}/{m.name}.py: depends on unknown migration {dep!r}")
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise ConfigError(f"{where}: dependency cycle: {' -> '.join(cycle)}")
        state[name] = 1
        for dep in found[name].dependencies:
            visit(dep, [*path, name])
        state[name] = 2

    for name in sorted(found):
        visit(name, [])
    initial = [m.name for m in found.values() if not m.dependencies]
    if found and len(initial) != 1:
        raise ConfigError(f"{where}: exactly one migration may have no dependencies; found {initial}")
    if not found:
        return []
    from pymongo_migrate.migrations import Migration, MigrationsGraph

    graph = MigrationsGraph()
    for m in found.values():
        graph.add_migration(Migration(m.name, list(m.dependencies)))
    ordered = [found[m.name] for m in graph]
    if len(ordered) != len(found):
        raise ConfigError(f"{where}: the migration graph is disconnected")
    return ordered


@dataclass
class _Opened:
    """What a target opened itself, so that close() can release it."""

    client: MongoClient | None = None  # built from MONGODB_URL or the embedded server's address
    server: Any = None  # the embedded server in use, once started


@dataclass(frozen=True)
class MongoTarget:
    """One environment's MongoDB database: its settings, and the connection it opens on first use."""

    env: Environment
    client: MongoClient | None = None  # given by the caller (tests, clone's destination), never closed here
    _opened: _Opened = field(default_factory=_Opened, init=False, repr=False, compare=False)

    @property
    def embedded(self) -> bool:
        """No client given and no MONGODB_URL: the embedded server."""
        return self.client is None and self.env.mongodb_url is None and self.env.embedded

    @property
    def server(self) -> Any:
        """The embedded server in use, once started."""
        return self._opened.server

    @property
    def database(self) -> str:
        return self.env.mongo_database

    @property
    def label(self) -> str:
        return f"{self.env.name} (database {self.database})"

    @property
    def configured(self) -> bool:
        return self.client is not None or self.env.mongodb_url is not None or self.env.embedded

    def embedded_server(self) -> Any:
        """Start (or reuse) the embedded server when this target uses it; None otherwise."""
        if self._opened.server is None and self.embedded:
            from . import embedded_mongo

            self._opened.server = embedded_mongo.ensure(self.env.state_dir)
        return self._opened.server

    def connect(self) -> Database:
        """The environment's database, after checking the server answers (5 s bound)."""
        client = self.client if self.client is not None else self._opened.client
        if client is None:
            from pymongo import MongoClient
            from pymongo.errors import ConfigurationError, InvalidURI

            server = self.embedded_server()
            url = server.url if server is not None else self.env.mongodb_url.reveal()  # type: ignore[union-attr]
            try:
                client = self._opened.client = MongoClient(url, tz_aware=True, serverSelectionTimeoutMS=TIMEOUT_MS,
                                                           connectTimeoutMS=TIMEOUT_MS, socketTimeoutMS=60_000)
            except (ConfigurationError, InvalidURI, ValueError) as exc:
                raise ConfigError(f"MONGODB_URL {self.env.mongodb_url.masked!r} is invalid: "  # type: ignore[union-attr]
                                  f"{scrub(str(exc), self.env.secrets())}") from None
        from pymongo.errors import PyMongoError

        try:
            client.admin.command("ping")
        except PyMongoError as exc:
            if self.env.mongodb_url:
                where = self.env.mongodb_url.masked
            elif self._opened.server is not None:
                where = (f"the embedded server ({self._opened.server.address}; its log is "
                         f"{self._opened.server.home / 'server.log'})")
            else:
                where = "the server"
            reason = unreachable_reason(exc, self.env.secrets())
            raise StoreUnreachableError(f"mongo: cannot reach {where}: {reason}") from None
        return client[self.database]

    @property
    def live_client(self) -> MongoClient | None:
        """The client in use: the one given, or the one this target opened (None before connect)."""
        return self.client if self.client is not None else self._opened.client

    def close(self) -> None:
        """Close the client this target opened (a given one is the caller's)."""
        if self._opened.client is not None:
            self._opened.client.close()
            self._opened.client = None


def _utc(db: Database, name: str) -> Any:
    from bson.codec_options import CodecOptions

    return db[name].with_options(codec_options=CodecOptions(tz_aware=True, tzinfo=dt.timezone.utc))


def applied_names(db: Database) -> set[str]:
    """Names recorded as applied in the state collection (read only)."""
    return {d["name"] for d in _utc(db, STATE_COLLECTION).find({"applied": {"$ne": None}}, {"name": 1})}


def plan(target: MongoTarget, migrations: list[MongoMigration] | None = None) -> TargetPlan:
    """Which migrations the environment's database has applied and which are pending."""
    migrations = load_migrations() if migrations is None else migrations
    db = target.connect()
    done = applied_names(db)
    applied = [m.name for m in migrations if m.name in done]
    pending = tuple(Step(STORE, target.env.name, target.database, m.name, m.description)
                    for m in migrations if m.name not in done)
    head = (migrations[-1].name,) if migrations else ()
    return TargetPlan(STORE, target.env.name, target.database, tuple(applied[-1:]), head, pending)


def up_to_date(target: MongoTarget, planned: TargetPlan) -> bool:
    """Whether ``apply`` would find nothing to do: nothing pending and the head's shape recorded.
    Read without the lock; a run that is still applying leaves something pending, and apply then
    waits for it."""
    if planned.pending:
        return False
    return not planned.current or mongo_shape.recorded(target.connect(), planned.current[-1]) is not None


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _pid_gone(pid: Any) -> bool:
    """Whether no live process on this host has this pid (a reaped or zombie process is gone)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, run by another user
        return False
    try:  # a killed child its parent has not reaped yet still answers kill(0)
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _dead_holder(holder: dict[str, Any]) -> bool:
    """The holder recorded this host and its process is gone: its lock can be taken at once."""
    return (holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid()
            and _pid_gone(holder.get("pid")))


def describe_holder(holder: dict[str, Any]) -> str:
    """One line naming a lock's holder, when it took the lock and when its lease ends."""
    return (f"{holder.get('owner', '?')} since {_iso(holder.get('acquired_at'))} "
            f"(lease until {_iso(holder.get('expires_at'))})")


class LockLost(Exception):
    """The lease ran out or the lock was taken over while this run held it."""


class Lease:
    """A held migration lock, renewed by a daemon thread while the run is alive.

    Renewal is a compare-and-set on the owner: when it finds the lock gone or held by
    another run (an unlock, or a takeover after a missed renewal), the lease is lost.
    ``check`` renews before each step, so the run stops before its next step.
    """

    def __init__(self, locks: Any, owner: str, lease: dt.timedelta, expires_at: dt.datetime) -> None:
        self.locks, self.owner, self.lease = locks, owner, lease
        self.expires_at = expires_at
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"mongo-lock-{owner}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def renew(self) -> bool:
        """Push the lease forward; return False (and mark it lost) when the lock is no longer ours."""
        from pymongo import ReturnDocument

        if self.lost is not None:
            return False
        now = clock.now()
        try:
            doc = self.locks.find_one_and_update({"_id": LOCK_ID, "owner": self.owner},
                                                 {"$set": {"expires_at": now + self.lease, "renewed_at": now}},
                                                 return_document=ReturnDocument.AFTER)
            holder = None if doc is not None else self.locks.find_one({"_id": LOCK_ID})
        except Exception:  # noqa: BLE001 - a failed renewal is retried until the lease runs out
            if now >= self.expires_at:  # another run may hold it by now
                self.lost = "the lease ran out while it could not be renewed"
            return self.lost is None
        if doc is None:
            self.lost = (f"it is now held by {describe_holder(holder)}" if holder
                         else "it was released by another process (momentry-db unlock?)")
            return False
        self.expires_at = doc["expires_at"]
        return True

    def check(self) -> None:
        """Confirm on the server that the lock is still this run's (renewing it); raise LockLost if not.

        The heartbeat alone would notice an unlock or a takeover only at its next beat,
        so a step could start under a lock that another run already holds.
        """
        self.renew()
        if self.lost is not None:
            raise LockLost(self.lost)

    def _beat(self) -> None:
        interval = max(self.lease.total_seconds() / 3, 0.05)
        while not self._stop.wait(interval):
            if not self.renew():
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=TIMEOUT_MS / 1000)  # a renewal stuck on the network must not hold the exit


@contextmanager
def migration_lock(db: Database, *, timeout: float, lease: dt.timedelta = LOCK_LEASE,
                   poll: float = 0.2, hint: str = "retry when it finishes") -> Iterator[Lease]:
    """Hold the database's migration lock for the block; yields its Lease.

    The lock is one document with a unique _id, taken by insert or by a compare-and-set
    on its current owner. A live holder renews a short lease; a lease that ran out (a
    crashed run elsewhere), or a holder on this host whose process is gone, is taken
    over at once. Release deletes the document only while this run still owns it.
    """
    from pymongo.errors import DuplicateKeyError

    locks = _utc(db, LOCK_COLLECTION)
    locks.create_index("expires_at", expireAfterSeconds=0)  # the server also clears stale locks
    owner = _owner()
    deadline = clock.monotonic() + timeout
    while True:
        now = clock.now()
        doc = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "acquired_at": now,
               "renewed_at": now, "expires_at": now + lease}
        holder = locks.find_one({"_id": LOCK_ID})
        if holder is None:
            try:
                locks.insert_one({"_id": LOCK_ID, **doc})
                break
            except DuplicateKeyError:
                continue  # another run got there first; look at it again
        expires = holder.get("expires_at")
        if not isinstance(expires, dt.datetime) or expires < now or _dead_holder(holder):
            taken = locks.find_one_and_update(
                {"_id": LOCK_ID, "owner": holder.get("owner"), "expires_at": expires},
                {"$set": doc})
            if taken is not None:
                break
            continue  # renewed or taken by someone else meanwhile
        if clock.monotonic() >= deadline:
            raise LockTimeoutError(f"mongo {db.name}: migration lock held by {describe_holder(holder)}; "
                                   f"{hint}")
        clock.sleep(poll)

    held = Lease(locks, owner, lease, doc["expires_at"])
    held.start()
    try:
        yield held
    finally:
        held.stop()
        locks.delete_one({"_id": LOCK_ID, "owner": owner})


def lock_holder(db: Database) -> dict[str, Any] | None:
    """The migration lock document, if a run holds (or a crashed run left) one."""
    return _utc(db, LOCK_COLLECTION).find_one({"_id": LOCK_ID})


def release(db: Database, owner: str) -> bool:
    """Remove the migration lock if ``owner`` still holds it; return whether it did."""
    return _utc(db, LOCK_COLLECTION).delete_one({"_id": LOCK_ID, "owner": owner}).deleted_count == 1


def _iso(value: Any) -> str:
    return value.isoformat(timespec="seconds") if isinstance(value, dt.datetime) else "?"


def apply(target: MongoTarget, migrations: list[MongoMigration] | None = None, *,
          emit: Callable[[str, Any], None] | None = None, lock_timeout: float = 30.0,
          lease: dt.timedelta = LOCK_LEASE, notice: Callable[[str], None] | None = None) -> list[Step]:
    """Apply every pending migration under the lock, recording each and its shape right after it succeeds.

    A head with no recorded shape (applied before shapes were recorded) gets the live
    shape as its baseline, announced through ``notice``.

    A migration that raises, or calls sys.exit, is recorded as failed and stops the run
    with a StoreError naming it; an interrupt (Ctrl-C) is recorded too, then stops the
    run as an interrupt. The lock is released either way.
    """
    migrations = load_migrations() if migrations is None else migrations
    db = target.connect()
    state = _utc(db, STATE_COLLECTION)
    history = _utc(db, HISTORY_COLLECTION)
    applied: list[Step] = []
    hint = (f"retry when it finishes, or if that run is gone, momentry-db unlock --env {target.env.name} "
            "--store mongo")
    with migration_lock(db, timeout=lock_timeout, lease=lease, hint=hint) as held:
        done = applied_names(db)  # read again under the lock: another run may have applied some
        for migration in migrations:
            if migration.name in done:
                continue
            try:
                held.check()
            except LockLost as lost:
                raise StoreError(STORE, target.label, f"migration {migration.name}",
                                 f"lost the migration lock ({lost}); not started. Rerun migrate "
                                 "once the other run is done") from None
            step = Step(STORE, target.env.name, target.database, migration.name, migration.description)
            started = dt.datetime.now(dt.timezone.utc)
            began = time.monotonic()

            def failed(reason: str) -> None:
                history.insert_one({"env": target.env.name, "store": STORE, "step": migration.name,
                                    "started_at": started, "duration_s": time.monotonic() - began,
                                    "outcome": "failed", "error": reason})

            try:
                migration.upgrade(db)
            except SystemExit as exc:  # a migration must not end the process, nor pick its exit code
                reason = f"called sys.exit({exc.code!r})"
                failed(reason)
                raise StoreError(STORE, target.label, f"migration {migration.name}", reason) from None
            except KeyboardInterrupt:
                failed("interrupted")
                raise
            except Exception as exc:
                reason = scrub(f"{type(exc).__name__}: {exc}".splitlines()[0], target.env.secrets())
                failed(reason)
                raise StoreError(STORE, target.label, f"migration {migration.name}", reason) from None
            # The same document pymongo-migrate writes (MigrationState), so its CLI agrees.
            state.replace_one({"name": migration.name},
                              {"name": migration.name, "applied": dt.datetime.now(dt.timezone.utc)},
                              upsert=True)
            mongo_shape.record(db, migration.name, mongo_shape.live_shape(db, BOOKKEEPING))
            history.insert_one({"env": target.env.name, "store": STORE, "step": migration.name,
                                "started_at": started, "duration_s": time.monotonic() - began,
                                "outcome": "applied"})
            applied.append(step)
            if emit is not None:
                emit("upgraded", step)
        head = next((m.name for m in reversed(migrations) if m.name in done), None)
        if not applied and head is not None and mongo_shape.recorded(db, head) is None:
            mongo_shape.record(db, head, mongo_shape.live_shape(db, BOOKKEEPING))
            if notice is not None:
                notice(f"mongo {target.label}: no shape was recorded at {head} (migrated before shapes were "
                       "recorded); recorded the live indexes and validators as its baseline")
    return applied


def preflight_drop(target: MongoTarget) -> bool:
    """Check that drop_database would succeed now, without writing; return whether the database exists.

    The server must answer within the timeout, let this login list databases and
    read the lock, and no live run may hold the database's migration lock.
    """
    from pymongo.errors import PyMongoError

    from ..errors import RefusedError

    db = target.connect()
    try:
        existed = exists(db)
        now = dt.datetime.now(dt.timezone.utc)
        held = _utc(db, LOCK_COLLECTION).find_one({"_id": LOCK_ID, "expires_at": {"$gte": now}})
    except PyMongoError as exc:
        reason = scrub(str(exc).split("\n")[0], target.env.secrets())
        raise RefusedError(f"mongo {target.label}: the server refused a read ({reason}); "
                           "check the login's roles on this database") from None
    if held:
        raise RefusedError(f"mongo {target.label}: migration lock held by {held.get('owner', '?')} since "
                           f"{_iso(held.get('acquired_at'))} (expires {_iso(held.get('expires_at'))}); "
                           "retry when it finishes")
    return existed


def exists(db: Any) -> bool:
    """Whether a database exists: it holds a collection. Asked of the database itself, so a login
    limited to it (readWrite, no listDatabases) can answer."""
    return bool(db.list_collection_names())


def drop_database(target: MongoTarget) -> bool:
    """Drop the environment's database; return whether it existed."""
    db = target.connect()
    existed = exists(db)
    db.client.drop_database(db.name)
    return existed


def clone(source: MongoTarget, dest: MongoTarget, limit: int | None,
          emit: Callable[[str, Any], None] | None = None, batch: int = 1000) -> dict[str, int]:
    """Copy every data collection of one environment's database into another's."""
    src, dst = source.connect(), dest.connect()
    counts: dict[str, int] = {}
    for name in sorted(src.list_collection_names()):
        if name in BOOKKEEPING or name.startswith("system."):
            continue
        dst[name].delete_many({})
        cursor = src[name].find({}, sort=[("_id", 1)])
        if limit is not None:
            cursor = cursor.limit(limit)
        copied, chunk = 0, []
        for doc in cursor:
            chunk.append(doc)
            if len(chunk) >= batch:
                dst[name].insert_many(chunk, bypass_document_validation=True)
                copied += len(chunk)
                chunk = []
        if chunk:
            dst[name].insert_many(chunk, bypass_document_validation=True)
            copied += len(chunk)
        counts[name] = copied
        if emit is not None:
            emit("copied", {"store": STORE, "target": f"{dst.name}.{name}", "count": copied})
    return counts


def history(target: MongoTarget, limit: int = 50) -> list[dict[str, Any]]:
    """Recorded steps, newest first, in the shape the history command shows."""
    db = target.connect()
    rows = []
    for doc in _utc(db, HISTORY_COLLECTION).find({}, sort=[("started_at", -1)], limit=limit):
        rows.append({"recorded_at": doc["started_at"].isoformat(timespec="seconds"), "env": doc.get("env"),
                     "store": STORE, "step": doc.get("step"), "description": "",
                     "duration_ms": int(doc.get("duration_s", 0) * 1000), "outcome": doc.get("outcome"),
                     "error": doc.get("error")})
    return rows


def held_locks(target: MongoTarget) -> list[HeldLock]:
    """The environment's migration lock, if one is held, with its holder described."""
    db = target.connect()
    holder = lock_holder(db)
    if holder is None:
        return []
    now = clock.now()
    expires = holder.get("expires_at")
    state = ("its lease ran out" if not isinstance(expires, dt.datetime) or expires < now
             else "its process on this host is gone" if _dead_holder(holder)
             else "its lease is live: that run may still be migrating")
    return [HeldLock(STORE, target.label, f"{describe_holder(holder)}; {state}", token=holder.get("owner"))]


def release_lock(target: MongoTarget, lock: HeldLock) -> bool:
    """Remove the migration lock shown in ``lock``, only if that holder still has it."""
    return release(target.connect(), lock.token)

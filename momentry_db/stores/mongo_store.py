"""MongoDB behind the store interface: migrate runs, history, reset, verify, drift, clone and unlock,
on top of stores/mongo.py."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..environments import Environment
from ..plan import TargetOutcome, TargetPlan, unplanned
from .base import Context, Drop, MigrationWork, declared_dir, same_server, shown_path

STORE = "mongo"


def configured(env: Environment, sources: Any) -> bool:
    """Whether ``env`` has a MongoDB: a client given, MONGODB_URL, or the embedded server."""
    return sources.mongo_client is not None or env.mongodb_url is not None or env.embedded


def announce_embedded(ctx: Context, target: Any) -> None:
    """Start (or reuse) the embedded MongoDB server when ``target`` uses it, and say so."""
    if target.server is not None:
        return
    server = target.embedded_server()
    if server is None:
        return
    shown = shown_path(server.home)
    if server.replaced:
        ctx.run.notice(f"mongo: the embedded server in {shown} was stale ({server.replaced}); started a new one")
    ctx.run.notice(f"mongo: MONGODB_URL is not set; using the embedded server in {shown} ({server.address})")


@contextmanager
def opened(ctx: Context, env: Environment) -> Iterator[Any]:
    """The environment's MongoDB target, closed afterwards; None (with a notice) when not configured."""
    from . import mongo

    target = mongo.MongoTarget(env, client=ctx.sources.mongo_client)
    if not target.configured:
        ctx.run.skip(STORE, "MONGODB_URL is not set")
        yield None
        return
    try:
        announce_embedded(ctx, target)
        yield target
    finally:
        target.close()


class MongoStore:
    """MongoDB: one database per environment, migrated by pymongo-migrate modules."""

    name = STORE
    migrates = True

    def load(self, ctx: Context) -> Any:
        from . import mongo

        return mongo.load_migrations(declared_dir(ctx, "mongo_migrations", ctx.sources.mongo_migrations,
                                                   mongo.MIGRATIONS_DIR))

    def migration(self, work: MigrationWork) -> _Migration:
        return _Migration(work)

    def history(self, ctx: Context, env: Environment, declared: Any, limit: int) -> list[dict[str, Any]]:
        from . import mongo

        with opened(ctx, env) as target:
            return list(mongo.history(target, limit)) if target is not None else []

    def drop(self, ctx: Context, env: Environment, declared: Any, closing: Any) -> Drop | None:
        from . import mongo

        target = mongo.MongoTarget(env, client=ctx.sources.mongo_client)
        if not target.configured:
            return None
        announce_embedded(ctx, target)
        closing.callback(target.close)
        return Drop(STORE, target.label, f"database {env.mongo_database}",
                    lambda: mongo.preflight_drop(target),
                    lambda: env.mongo_database if mongo.drop_database(target) else None)

    def verify(self, ctx: Context, result: Any, env: Environment, others: list[Environment],
               declared: Any) -> None:
        from .. import verify as checks
        from ..errors import MomentryError
        from . import mongo

        target = mongo.MongoTarget(env, client=ctx.sources.mongo_client)
        try:
            announce_embedded(ctx, target)
        except MomentryError as exc:
            result.add(STORE, "server reachable", [str(exc)])
            return
        primary = next((o for o in others if o.primary), None) if not env.primary else None
        checks.check_mongo(result, env, others, target, declared,
                           primary=mongo.MongoTarget(primary, client=ctx.sources.mongo_client) if primary else None)

    def drift(self, ctx: Context, env: Environment, plan: TargetPlan) -> list[str] | None:
        """The live database against the shape recorded at its head."""
        from . import mongo, mongo_shape

        if plan.pending:
            return None
        if not plan.current:
            return []
        head, shown = plan.current[-1], f"mongo {env.name} (database {env.mongo_database})"
        target = mongo.MongoTarget(env, client=ctx.sources.mongo_client)
        try:
            drift = mongo_shape.drift_from_record(target.connect(), head, mongo.BOOKKEEPING)
        finally:
            target.close()
        if drift is None:
            return [f"{shown}: not checkable: no shape recorded at {head} (migrated before shapes were recorded); "
                    f"run momentry-db migrate --env {env.name} to record the live one as its baseline"]
        return [f"{shown}: {d}" for d in drift]

    def clone_check(self, ctx: Context, source: Environment, dest: Environment) -> None:
        from . import mongo

        same_server(STORE, ctx.sources.mongo_client, source, dest, "mongodb_url")
        first = mongo.MongoTarget(source, client=ctx.sources.mongo_client)
        try:
            if first.configured:  # an embedded server that cannot start stops the clone before any write
                announce_embedded(ctx, first)
        finally:
            first.close()

    def clone(self, ctx: Context, source: Environment, dest: Environment, declared: Any,
              tables: Sequence[str], limit: int | None) -> dict[str, int] | None:
        from . import mongo

        src = mongo.MongoTarget(source, client=ctx.sources.mongo_client)
        if not src.configured:
            ctx.run.skip(STORE, "MONGODB_URL is not set")
            return None
        try:
            dst = mongo.MongoTarget(dest, client=src.connect().client)
            return mongo.clone(src, dst, limit, ctx.emit)  # type: ignore[no-any-return]
        finally:
            src.close()

    @contextmanager
    def lock_target(self, ctx: Context, env: Environment, declared: Any) -> Iterator[Any]:
        from ..errors import ConfigError
        from . import mongo

        with opened(ctx, env) as target:
            if target is None:
                raise ConfigError(f"MONGODB_URL is not set for {env.name}; set it to the server whose lock "
                                  "should be released")
            yield mongo, target, ()


def _server_key(env: Environment) -> object:
    """Which server an environment's database lives on: its MONGODB_URL, or its embedded server."""
    return env.mongodb_url.reveal() if env.mongodb_url is not None else ("embedded", str(env.state_dir))


class _Migration:
    """MongoDB's part of a run: plan, then apply, each environment's database in turn; the environments
    of one server share one client."""

    def __init__(self, work: MigrationWork) -> None:
        self.work = work
        self.first: Any = None

    def preflight(self) -> None:
        from . import mongo

        w = self.work
        if w.envs:  # an embedded server that cannot start stops the run before any write
            self.first = mongo.MongoTarget(w.envs[0], client=w.sources.mongo_client)
            if self.first.configured:
                announce_embedded(w, self.first)

    def run(self) -> list[TargetOutcome]:
        from . import mongo

        w = self.work
        migrations = w.declared["mongo"]
        outcomes: list[TargetOutcome] = []
        from ..errors import StoreUnreachableError

        owners: dict[object, Any] = {}  # per server: the target whose client the later environments share
        dead: dict[object, Exception] = {}  # per server: why it could not be reached (waited on once)
        try:
            for i, env in enumerate(w.envs):
                server = _server_key(env)
                owner = owners.get(server)
                shared = w.sources.mongo_client or (owner.live_client if owner is not None else None)
                target = self.first if i == 0 else mongo.MongoTarget(env, client=shared)
                if not target.configured:
                    continue
                plan = unplanned("mongo", env.name, env.mongo_database)
                if server in dead:
                    outcomes.append(w.failed(plan, dead[server], env))
                    target.close()
                    continue
                try:
                    plan = mongo.plan(target, migrations)
                    outcome = w.planned(plan)
                    if w.apply and not mongo.up_to_date(target, plan):
                        outcome = w.done(plan, mongo.apply(target, migrations, emit=w.emit,
                                                           lock_timeout=w.lock_timeout, notice=w.run.notice))
                    elif w.apply:
                        outcome = w.done(plan, [])
                    outcomes.append(outcome)
                except Exception as exc:  # noqa: BLE001 - this target's outcome
                    outcomes.append(w.failed(plan, exc, env))
                    if isinstance(exc, StoreUnreachableError) and w.sources.mongo_client is None:
                        dead[server] = exc
                        target.close()
                        continue
                if server not in owners and target.live_client is not None and target.client is None:
                    owners[server] = target  # connected: its client serves this server's other environments
                elif all(o is not target for o in owners.values()):
                    target.close()
        finally:
            for owner in owners.values():
                owner.close()
        if w.envs and not any(configured(e, w.sources) for e in w.envs):
            w.run.skip("mongo", "MONGODB_URL is not set")
        return outcomes

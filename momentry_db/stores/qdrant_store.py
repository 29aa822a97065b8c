"""Qdrant behind the store interface: migrate runs, history, reset, verify, clone and unlock, on top of
stores/qdrant.py."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..environments import Environment
from ..plan import Step, TargetOutcome, TargetPlan, unplanned
from .base import Context, Drop, MigrationWork, declared_dir, same_server, shown_path

STORE = "qdrant"


def announced(ctx: Context, env: Environment) -> Any:
    """The environment's QdrantTarget; local mode and a key sent over plain http are announced."""
    from . import qdrant

    target = qdrant.QdrantTarget(env, client=ctx.sources.qdrant_client, lock_timeout=ctx.lock_timeout)
    if target.local and ctx.sources.qdrant_client is None:
        ctx.run.notice(f"qdrant: QDRANT_URL is not set; using local mode in {shown_path(env.state_dir / 'qdrant')}")
    if target.key_over_plain_http:
        ctx.run.notice("qdrant: warning: QDRANT_API_KEY is sent over plain http; use https for remote servers")
    return target


class QdrantStore:
    """Qdrant: declared collection specs, one aliased collection per environment and spec."""

    name = STORE
    migrates = True

    def load(self, ctx: Context) -> Any:
        from ..errors import MomentryError
        from . import qdrant

        specs = qdrant.load_specs(declared_dir(ctx, "qdrant_specs", ctx.sources.qdrant_specs, qdrant.SPECS_DIR))
        resolvable = []
        for name in ctx.project.registry.names:  # one whose settings do not resolve fails when used itself
            try:
                resolvable.append(ctx.project.environment(name, one_of_many=True))
            except MomentryError:
                continue
        qdrant.check_spec_names(specs, resolvable)
        return specs

    def migration(self, work: MigrationWork) -> _Migration:
        return _Migration(work)

    def history(self, ctx: Context, env: Environment, declared: Any, limit: int) -> list[dict[str, Any]]:
        from . import qdrant

        with announced(ctx, env).session() as client:
            return list(qdrant.history(client, env, declared))

    def drop(self, ctx: Context, env: Environment, declared: Any, closing: Any) -> Drop | None:
        from . import qdrant

        target = announced(ctx, env)
        names = ", ".join(env.qdrant_collection_for(spec.name) for spec in declared)

        def drop_collections() -> list[str]:
            with target.session() as client:
                return qdrant.drop(client, env, declared)  # type: ignore[no-any-return]

        return Drop(STORE, f"{env.name} (collection {names})", f"collection {names}",
                    lambda: qdrant.preflight_drop(target, declared), drop_collections)

    def verify(self, ctx: Context, result: Any, env: Environment, others: list[Environment],
               declared: Any) -> None:
        from .. import verify as checks

        checks.check_qdrant(result, env, others, announced(ctx, env), declared)

    def drift(self, ctx: Context, env: Environment, plan: TargetPlan) -> list[str] | None:
        return []  # a collection is compared by verify, against its spec

    def clone_check(self, ctx: Context, source: Environment, dest: Environment) -> None:
        same_server(STORE, ctx.sources.qdrant_client, source, dest, "qdrant_url")

    def clone(self, ctx: Context, source: Environment, dest: Environment, declared: Any,
              tables: Sequence[str], limit: int | None) -> dict[str, int] | None:
        from . import qdrant

        with announced(ctx, source).session() as client:
            return qdrant.clone_points(client, source, dest, declared, limit, ctx.emit)  # type: ignore[no-any-return]

    @contextmanager
    def lock_target(self, ctx: Context, env: Environment, declared: Any) -> Iterator[Any]:
        from . import qdrant

        yield qdrant, announced(ctx, env), (declared,)


class _Migration:
    """Qdrant's part of a run: one plan per declared collection, applied in one session per environment."""

    def __init__(self, work: MigrationWork) -> None:
        self.work = work
        self.early: dict[str, BaseException] = {}  # per environment: found before any store wrote

    def preflight(self) -> None:
        from ..errors import MomentryError
        from . import qdrant

        w = self.work
        if not w.apply:
            return
        for env in w.envs:  # an immutable change without --recreate-qdrant is refused before any write
            target = qdrant.QdrantTarget(env, client=w.sources.qdrant_client, lock_timeout=w.lock_timeout)
            try:
                found = qdrant.check_apply(target, w.declared["qdrant"], recreate=w.recreate_qdrant)
            except MomentryError as exc:
                if len(w.envs) == 1 or not w.keep_going:
                    raise
                found = exc
            if found is not None:  # reported as this target's outcome, without waiting on the server again
                self.early[env.name] = found

    def run(self) -> list[TargetOutcome]:
        from . import qdrant

        w = self.work
        specs = w.declared["qdrant"]
        outcomes: list[TargetOutcome] = []
        for env in w.envs:
            try:
                target = announced(w, env)
                if env.name in self.early:
                    raise self.early[env.name]
                cached = qdrant.cached_plans(target, specs)
                if cached is not None:  # local mode, unchanged since the last run: nothing to open
                    outcomes += [w.planned(p) for p in cached]
                    continue
                applied: list[Step] = []
                with target.session() as client:
                    before = qdrant.storage_mark(target)
                    bound = target.bound(client)  # one connection (and one local-mode lock) for plan and apply
                    plans = qdrant.plan(bound, specs)
                    for p in plans:
                        w.emit("planned", p)
                    if w.apply:
                        applied = qdrant.apply(bound, specs, recreate=w.recreate_qdrant, emit=w.emit)
                    if w.apply or not any(p.pending for p in plans):
                        qdrant.write_stamp(target, specs, before)
                for p in plans:
                    mine = [s for s in applied if s.target == p.target]
                    outcomes.append(w.done(p, mine) if w.apply else
                                    TargetOutcome(p, "up to date" if not p.pending else
                                                  "would apply" if w.dry_run else "pending"))
            except Exception as exc:  # noqa: BLE001 - this target's outcome
                outcomes.append(w.failed(unplanned("qdrant", env.name, env.qdrant_collection), exc, env))
        return outcomes



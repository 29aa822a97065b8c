"""PostgreSQL behind the store interface: migrate runs over many schemas, history, reset, verify,
clone and unlock, on top of the stores/postgres package."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..environments import Environment
from ..plan import TargetOutcome, TargetPlan, unplanned
from .base import Consent, Context, Drop, MigrationWork, shown_path

STORE = "postgres"


def target(ctx: Context, env: Environment) -> Any:
    """The environment's PgTarget; the embedded server is announced when it is used."""
    from . import postgres

    found = postgres.PgTarget(env, emit=ctx.emit, lock_wait=ctx.lock_timeout)
    found.url()
    if found.embedded:
        ctx.run.notice(f"postgres: DATABASE_URL is not set; using the embedded server in "
                       f"{shown_path(env.state_dir / 'pg')} (database momentry)")
    return found


def _consent_to_risks(target: Any, plan: TargetPlan, consent: Consent, scripts: Path | None) -> None:
    """Lint prod's pending SQL; risky statements need explicit consent."""
    from ..errors import RefusedError
    from ..lint import lint_sql
    from . import postgres

    env = target.env
    if not plan.pending or (not plan.current and not plan.unmanaged):
        return  # nothing pending, or none of our tables yet: no data to lock, no client to break
    sql = plan.sql or postgres.offline_sql(target, f"{plan.current[0]}:head" if plan.current else "head",
                                           script_location=scripts)
    findings = lint_sql(sql, f"postgres {env.name} (schema {env.schema})")
    if not findings:
        return
    summary = "; ".join(str(f) for f in findings[:5]) + (f"; and {len(findings) - 5} more" if len(findings) > 5 else "")
    if not consent(f"{len(findings)} risky statement(s) in the pending revisions for {env.name}: {summary}"):
        raise RefusedError(f"{env.name}: lint found {len(findings)} risky statement(s) in the pending revisions "
                           f"({findings[0]}); review them with momentry-db lint --env {env.name}, then rerun "
                           "with --accept-risky")


def kept_file(ctx: Context) -> Path:
    """Where what a run needs of the revision files is kept between runs (see ``postgres.Kept``)."""
    return ctx.project.state_dir / "postgres-scripts.json"


class PostgresStore:
    """PostgreSQL: one schema per environment, migrated by Alembic."""

    name = STORE
    migrates = True

    def load(self, ctx: Context) -> Any:
        from . import postgres

        # loading checks the revision files: one that fails to import, or a branched history, stops here
        return postgres.Kept.open(kept_file(ctx), ctx.scripts).heads()

    def migration(self, work: MigrationWork) -> _Migration:
        return _Migration(work)

    def history(self, ctx: Context, env: Environment, declared: Any, limit: int) -> list[dict[str, Any]]:
        from . import postgres

        return [{**row, "recorded_at": row["recorded_at"].isoformat(timespec="seconds")}
                for row in postgres.history(target(ctx, env), limit)]

    def drop(self, ctx: Context, env: Environment, declared: Any, closing: Any) -> Drop | None:
        from . import postgres

        found = target(ctx, env)
        return Drop(STORE, f"{env.name} (schema {env.schema})", f"schema {env.schema}",
                    lambda: postgres.preflight_drop(found),
                    lambda: env.schema if postgres.drop_schema(found) else None)

    def verify(self, ctx: Context, result: Any, env: Environment, others: list[Environment],
               declared: Any) -> None:
        from .. import verify as checks
        from ..errors import MomentryError

        try:
            found = target(ctx, env)
            checks.check_postgres(result, env, found, script_location=ctx.scripts)
            checks.check_privileges(result, env, others, found)
        except MomentryError as exc:
            result.add(STORE, "server reachable", [str(exc)])

    def drift(self, ctx: Context, env: Environment, plan: TargetPlan) -> list[str] | None:
        from . import postgres

        if plan.pending:
            return None
        return [f"postgres {env.name} (schema {env.schema}): {d}"
                for d in postgres.compare_live(postgres.PgTarget(env))]

    def clone_check(self, ctx: Context, source: Environment, dest: Environment) -> None:
        pass

    def clone(self, ctx: Context, source: Environment, dest: Environment, declared: Any,
              tables: Sequence[str], limit: int | None) -> dict[str, int] | None:
        from ..errors import RefusedError, StoreError
        from . import postgres

        src_t, dst_t = target(ctx, source), postgres.PgTarget(dest)
        if postgres.plan(dst_t, script_location=ctx.scripts).pending:
            raise RefusedError(f"postgres {dest.name} is not at head; run momentry-db migrate --env {dest.name} first")
        behind = postgres.plan(src_t, script_location=ctx.scripts)
        if behind.pending:  # the destination is at head; a source behind it has other columns
            at = ", ".join(behind.current) if behind.current else "base"
            raise StoreError(STORE, f"{source.name} (schema {behind.target})", "clone",
                             f"{source.name} is at revision {at}, behind {', '.join(behind.head)}; run "
                             f"momentry-db migrate --env {source.name} first, then clone again")
        return postgres.clone_tables(src_t, dst_t, tables, limit, ctx.emit)  # type: ignore[no-any-return]

    @contextmanager
    def lock_target(self, ctx: Context, env: Environment, declared: Any) -> Iterator[Any]:
        from . import postgres

        yield postgres, target(ctx, env), ()


class _Migration:
    """PostgreSQL's part of a run: read every schema's version, plan the ones behind, then upgrade them
    public first, compiled where schemas stand at the same revision (on ``parallel`` connections),
    else through Alembic (in ``parallel`` worker processes)."""

    def __init__(self, work: MigrationWork) -> None:
        from . import postgres

        self.work, self.pg = work, postgres
        self.targets: list[Any] = []
        self.kept = postgres.Kept.open(kept_file(work), work.scripts)

    def preflight(self) -> None:
        w = self.work
        if w.envs:
            target(w, w.envs[0])  # the embedded-server notice, once
        self.targets = [self.pg.PgTarget(env, emit=w.emit, lock_wait=w.lock_timeout) for env in w.envs]

    def run(self) -> list[TargetOutcome]:
        w, pg = self.work, self.pg
        outcomes: dict[str, TargetOutcome] = {}
        plans: dict[str, TargetPlan] = {}
        if w.apply:  # every target's version and unmanaged tables in one snapshot, not one connection each
            versions, bare = pg.read_states(self.targets, self.kept)
            head = self.kept.heads()
        for t in self.targets:
            if w.apply and versions[t.schema] == head:  # at head after one query: nothing to plan
                outcomes[t.schema] = w.planned(TargetPlan("postgres", t.env.name, t.schema, head, head))
                continue
            try:
                if w.apply:
                    plan = pg.plan_at(t, versions[t.schema] or (), bare.get(t.schema, ()), script_location=w.scripts,
                                      kept=self.kept)
                else:
                    plan = pg.plan(t, with_sql=w.dry_run, script_location=w.scripts, project=w.project)
                if w.apply and plan.pending:
                    plan.raise_if_unmanaged()
                    if t.primary:
                        _consent_to_risks(t, plan, w.consent, w.scripts)
            except Exception as exc:  # noqa: BLE001 - this target's outcome
                outcomes[t.schema] = w.failed(unplanned("postgres", t.env.name, t.schema), exc, t.env)
                continue
            outcomes[t.schema] = w.planned(plan)
            plans[t.schema] = plan
        pending = [t for t in self.targets if t.schema in plans and plans[t.schema].pending]
        streamed = None
        if w.apply and pending:
            results, streamed = self._upgrade(pending, versions)
            for t in pending:
                ran = results[t.schema]
                plan = plans[t.schema]
                if ran.error is None:
                    outcomes[t.schema] = w.done(plan, [s for s in plan.pending if s.name in ran.applied])
                else:
                    outcomes[t.schema] = w.failed(plan, ran.error, t.env)
        if w.apply:
            self._grants([t for t in self.targets if outcomes[t.schema].ok],
                         {t.schema for t in pending if outcomes[t.schema].ok}, streamed)
        return [outcomes[t.schema] for t in self.targets]

    def _grants(self, targets: list[Any], upgraded: set[str], streamed: Any) -> None:
        """Keep each migrated environment's role and grants current (a no-op run only reads), but for
        the ones made current while the schemas ran (``streamed``)."""
        from ..errors import MomentryError
        from .postgres import grants

        everyone = list(self.work.envs)
        if any(t.primary for t in targets):  # prod's new shared tables reach every environment's role
            project, known = self.work.project, {e.name for e in everyone}
            try:  # resolved once: the run's own environments are already
                everyone += [project.environment(n, one_of_many=True) for n in project.registry.names
                             if n not in known]
            except MomentryError:
                pass  # an environment that cannot be resolved is refused by its own run
        for notice in grants.ensure_grants(targets, everyone, changed=upgraded, streamed=streamed,
                                           scopes=self.kept.scopes):
            self.work.run.notice(notice)

    def _upgrade(self, pending: list[Any], versions: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        """Upgrade each target: what its run did (revisions applied, the error that stopped it), by
        schema; and the grants made while the compiled schemas ran (see ``grants.Alongside``)."""
        w = self.work
        done: dict[str, Any] = {}
        primary = [t for t in pending if t.primary]
        others = [t for t in pending if not t.primary]
        if primary:  # public first: compiled, one round trip, unless its path needs Alembic
            start = versions[primary[0].schema]
            ran, rest = self._compiled(primary, start or ()) if start != () else ({}, primary)
            done.update(ran)
            if rest:
                done.update(self._alembic(rest))
        starts: dict[tuple[str, ...], list[Any]] = {}
        left: list[Any] = []
        for t in others:  # compile each revision path once for the schemas at the same revision
            if versions[t.schema] == ():  # an empty alembic_version (downgraded to base): Alembic's path
                left.append(t)
            else:
                starts.setdefault(versions[t.schema] or (), []).append(t)
        from .postgres.grants import Alongside

        # grants made as the compiled schemas commit: the end of the run waits for one batch, not all
        along = Alongside.for_run([t for group in starts.values() if len(group) > 1 for t in group],
                                  self.kept.scopes)
        try:
            for start, group in starts.items():  # one schema alone gains nothing from compiling: Alembic runs it
                if len(group) > 1:
                    ran, rest = self._compiled(group, start, along.committed if along else None)
                    done.update(ran)
                    left += rest
                else:
                    left += group
        finally:
            streamed = along.finish() if along else None
        if left and w.parallel > 1:
            done.update(self._workers(left))
        elif left:
            done.update(self._alembic(left))
        return done, streamed

    def _alembic(self, targets: list[Any]) -> dict[str, Any]:
        return self.pg.upgrade_many(targets, script_location=self.work.scripts,  # type: ignore[no-any-return]
                                    project=self.work.project)

    def _compiled(self, targets: list[Any], start: tuple[str, ...],
                  on_commit: Any = None) -> tuple[dict[str, Any], list[Any]]:
        """The compiled run of targets at one revision; what stops it early is each target's outcome."""
        try:
            return self.pg.upgrade_compiled(targets, start, script_location=self.work.scripts,  # type: ignore[no-any-return]
                                            parallel=self.work.parallel, on_commit=on_commit, kept=self.kept)
        except Exception as exc:  # noqa: BLE001 - one outcome per target, never an aborted run
            return {t.schema: self.pg.SchemaRun(error=self.pg.failure(t, exc)) for t in targets}, []

    def _workers(self, targets: list[Any]) -> dict[str, Any]:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from ..errors import MomentryError

        w, pg = self.work, self.pg
        parallel = w.parallel
        chunks = [targets[i::parallel] for i in range(min(parallel, len(targets)))]
        done: dict[str, Any] = {}
        with ProcessPoolExecutor(len(chunks), mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(pg.upgrade_chunk, [t.env for t in chunk], w.scripts, w.lock_timeout)
                       for chunk in chunks]
            for chunk, future in zip(chunks, futures):
                try:
                    rows = future.result()
                except Exception as exc:  # noqa: BLE001 - a worker that died: each of its targets failed
                    for t in chunk:
                        done[t.schema] = pg.SchemaRun(error=pg.failure(t, exc))
                    continue
                for schema, applied, error in rows:
                    done[schema] = pg.SchemaRun(tuple(applied), MomentryError(error) if error else None)
        return done



"""The momentry-db command line: parse options, call command.py, report, exit."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from .errors import EXIT_FAILURE, MomentryError

ENV_HELP = "Environment name: prod, dev, or one declared in momentry-db.toml / MOMENTRY_EXTRA_ENVS."


def _run(ctx: click.Context, as_json: bool, work: Callable[[Any, Any], Any]) -> None:
    """Run a command function, render its result, and map errors to exit codes."""
    from .environments import scrub
    from .report import Reporter
    from .settings import load_project

    reporter = Reporter(as_json=as_json)
    secrets: list[Any] = []
    result = None
    try:
        project = load_project(ctx.obj.get("project_dir"))
        secrets = _known_secrets(ctx, project)
        reporter.scrub_with(secrets)
        with _warnings_as_notices(reporter, secrets):
            try:
                result = work(project, reporter)
            finally:
                _leave_mongo_monitors()
        if result is not None:
            reporter.result(result)
    except MomentryError as exc:
        reporter.error(exc, scrub(str(exc), secrets))
        ctx.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the one place unexpected errors are reported
        if os.environ.get("MOMENTRY_DEBUG"):
            raise
        message = scrub(f"unexpected {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                        secrets)
        reporter.error(MomentryError(message), message + " (set MOMENTRY_DEBUG=1 for a traceback)")
        ctx.exit(EXIT_FAILURE)
    if result is not None and getattr(result, "ok", True) is False:  # a failed check
        ctx.exit(EXIT_FAILURE)


def _leave_mongo_monitors() -> None:
    """Let the process exit without joining pymongo's monitor threads.

    pymongo joins them at exit, and a monitor waiting on a streaming ``hello`` notices that its
    client was closed only at its next half-second poll: every command that used MongoDB would end
    up to half a second later. Each client a command opens is closed when the command ends, and
    what is left of a monitor only reads, so its daemon thread is left to end with the process.
    """
    import atexit

    for name in ("pymongo.synchronous.monitor", "pymongo.monitor"):  # where pymongo registers it, by release
        shutdown = getattr(sys.modules.get(name), "_shutdown_resources", None)
        if shutdown is not None:
            atexit.unregister(shutdown)


@contextmanager
def _warnings_as_notices(reporter: Any, secrets: list[str]) -> Iterator[None]:
    """Warnings from the clients (pymongo, qdrant-client, ...) become one-line notices, secrets masked."""
    import warnings

    from .environments import scrub

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        reporter("notice", scrub("warning: " + " ".join(str(message).split()), secrets))

    with warnings.catch_warnings():  # the filters stay as they are; only how a warning is shown changes
        warnings.showwarning = show
        yield


def _known_secrets(ctx: click.Context, project: Any) -> list[Any]:
    """Secrets from every environment's settings and this command's options, for scrubbing output."""
    from .settings import secret_values

    env_file = ctx.params.get("env_file")
    found = list(project.secrets([env_file] if env_file else []))
    for option, variable in (("database_url", "DATABASE_URL"), ("admin_url", "--admin-url")):
        if ctx.params.get(option):
            found += secret_values(variable, ctx.params[option])
    return found


def _consent(given: bool) -> Callable[[str], bool]:
    """Consent for risky work: the flag, or a yes typed on a terminal; never assumed."""

    def ask(question: str) -> bool:
        if given:
            return True
        if not sys.stdin.isatty():
            return False
        return click.confirm(f"{question}\nProceed?", default=False, err=True)

    return ask


def _overrides(database_url: str | None, pg_lock_timeout: str | None = None,
               pg_statement_timeout: str | None = None) -> dict[str, str | None]:
    values = {"DATABASE_URL": database_url, "MOMENTRY_PG_LOCK_TIMEOUT": pg_lock_timeout,
              "MOMENTRY_PG_STATEMENT_TIMEOUT": pg_statement_timeout}
    return {k: v for k, v in values.items() if v}


env_option = click.option("--env", "env_name", required=True, metavar="NAME", help=ENV_HELP)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
env_file_option = click.option(
    "--env-file", type=click.Path(dir_okay=False, path_type=Path),
    help="Read settings from this file instead of the environment's default (.env, .env.development).")
url_option = click.option("--database-url", metavar="URL",
                          help="PostgreSQL URL; overrides DATABASE_URL from the environment and env file.")


class Seconds(click.ParamType):
    """A finite number of seconds, zero or more (nan, inf and negative values are refused)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or seconds < 0:
            self.fail(f"{value!r} is not a finite number of seconds, zero or more", param, ctx)
        return seconds


lock_timeout_option = click.option(
    "--lock-timeout", type=Seconds(), default=30.0, show_default=True,
    help="Seconds to wait for another run's migration lock (every store) before failing.")


def pg_timeout_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--pg-statement-timeout", metavar="DURATION",
                      help="PostgreSQL statement_timeout for migration sessions (default 30min; "
                           "MOMENTRY_PG_STATEMENT_TIMEOUT).")(fn)
    return click.option("--pg-lock-timeout", metavar="DURATION",
                        help="PostgreSQL lock_timeout for migration sessions (default 5s; "
                             "MOMENTRY_PG_LOCK_TIMEOUT).")(fn)


envs_option = click.option("--env", "env_names", multiple=True, metavar="NAME",
                           help=ENV_HELP + " Repeat it for several environments.")
all_option = click.option("--all", "all_envs", is_flag=True, help="Every configured environment, prod first.")


def read_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--env (repeatable), --all, --store, --json, --env-file and --database-url, as plan, status and check take them."""
    for option in reversed((envs_option, all_option, store_option, json_option, env_file_option, url_option)):
        fn = option(fn)
    return fn


def _chosen_envs(env_names: tuple[str, ...], all_envs: bool, *per_env: Any) -> Any:
    """The --env names (None for --all); per-environment options take exactly one --env."""
    if not env_names and not all_envs:
        raise click.UsageError("give --env NAME (repeatable) or --all")
    if (all_envs or len(set(env_names)) > 1) and any(per_env):
        raise click.UsageError("with several environments, use the environment and files for settings; "
                               "--env-file and --database-url take one --env")
    return None if all_envs else list(env_names)


store_option = click.option("--store", "stores", multiple=True, metavar="STORE",
                            help="Limit the run to this store (repeatable): postgres, mongo, qdrant.")


class MainGroup(click.Group):
    """The command group; with --json, click's own usage errors are a JSON error document too."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        options = args[:args.index("--")] if "--" in args else args
        if not standalone_mode or "--json" not in options:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            from .report import JSON_VERSION

            message = " ".join(exc.format_message().split())
            kind = "UsageError" if isinstance(exc, click.UsageError) else type(exc).__name__
            click.echo(f"error: {message}", err=True)
            click.echo(json.dumps({"version": JSON_VERSION, "ok": False, "error": {
                "type": kind, "message": message, "exit_code": exc.exit_code}}, indent=2))
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=MainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--project-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where momentry-db.toml and the env files live (default: the current directory).")
@click.version_option(package_name="momentry-db")
@click.pass_context
def main(ctx: click.Context, project_dir: Path | None) -> None:
    """Migrate and verify Momentry's stores, one environment at a time.

    \b
    Exit codes: 0 success; 1 a failure inside a store (including an unreachable
    MongoDB or Qdrant, or a lock wait that timed out) or a failed check; 2 bad input,
    bad configuration, an unreachable PostgreSQL, or a refused command.
    """
    ctx.ensure_object(dict)
    ctx.obj["project_dir"] = project_dir


@main.command()
@click.option("--env", "env_names", multiple=True, metavar="NAME",
              help=ENV_HELP + " Repeat it to migrate several environments in one run.")
@click.option("--all", "all_envs", is_flag=True, help="Migrate every configured environment, prod first.")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True, metavar="K",
              help="With several environments: migrate K schemas at once (K connections).")
@store_option
@click.option("--dry-run", is_flag=True, help="Print what would run, with the SQL per schema; change nothing.")
@click.option("--recreate-qdrant", is_flag=True,
              help="Allow an immutable Qdrant change: new collection, copied points, atomic alias swap.")
@lock_timeout_option
@click.option("--accept-risky", is_flag=True,
              help="On prod, apply revisions even when lint finds risky DDL (otherwise asked, or refused).")
@pg_timeout_options
@json_option
@env_file_option
@url_option
@click.pass_context
def migrate(ctx: click.Context, env_names: tuple[str, ...], all_envs: bool, parallel: int,
            stores: tuple[str, ...], dry_run: bool, recreate_qdrant: bool,
            lock_timeout: float, accept_risky: bool, pg_lock_timeout: str | None,
            pg_statement_timeout: str | None, as_json: bool, env_file: Path | None,
            database_url: str | None) -> None:
    """Apply every pending migration to one environment (or several): postgres, mongo, qdrant."""
    from . import command

    if not env_names and not all_envs:
        raise click.UsageError("give --env NAME (repeatable) or --all")
    if (all_envs or len(set(env_names)) > 1) and (
            dry_run or recreate_qdrant or env_file or database_url or pg_lock_timeout or pg_statement_timeout):
        raise click.UsageError("with several environments, use the environment and files for settings; "
                               "--dry-run, --recreate-qdrant, --env-file, --database-url and the "
                               "--pg-* options take one --env")
    _run(ctx, as_json, lambda project, emit: command.migrate(
        project, None if all_envs else env_names, stores=stores, dry_run=dry_run, recreate_qdrant=recreate_qdrant,
        env_file=env_file, overrides=_overrides(database_url, pg_lock_timeout, pg_statement_timeout),
        emit=emit, lock_timeout=lock_timeout, consent=_consent(accept_risky), keep_going=True,
        parallel=parallel))


@main.command()
@read_options
@click.pass_context
def plan(ctx: click.Context, env_names: tuple[str, ...], all_envs: bool, stores: tuple[str, ...], as_json: bool,
         env_file: Path | None, database_url: str | None) -> None:
    """Show what migrate would run, with the SQL per schema (migrate --dry-run, for one env or several)."""
    from . import command

    names = _chosen_envs(env_names, all_envs, env_file, database_url)
    _run(ctx, as_json, lambda project, emit: command.migrate(
        project, names, stores=stores, dry_run=True, env_file=env_file,
        overrides=_overrides(database_url), emit=emit))


@main.command()
@read_options
@click.pass_context
def status(ctx: click.Context, env_names: tuple[str, ...], all_envs: bool, stores: tuple[str, ...], as_json: bool,
           env_file: Path | None, database_url: str | None) -> None:
    """Show the current and pending migrations of one environment, or a matrix of several."""
    from . import command

    names = _chosen_envs(env_names, all_envs, env_file, database_url)
    _run(ctx, as_json, lambda project, emit: command.status(
        project, names, stores=stores, env_file=env_file, overrides=_overrides(database_url),
        emit=emit))


@main.command()
@envs_option
@all_option
@click.option("--store", "stores", multiple=True, metavar="STORE",
              help="Limit the checks (repeatable): postgres, mongo, qdrant, redis, dirs.")
@json_option
@env_file_option
@url_option
@click.pass_context
def verify(ctx: click.Context, env_names: tuple[str, ...], all_envs: bool, stores: tuple[str, ...], as_json: bool,
           env_file: Path | None, database_url: str | None) -> None:
    """Prove an environment's isolation (or several): every check passes, fails, or is not checkable here."""
    from . import command

    names = _chosen_envs(env_names, all_envs, env_file, database_url)
    _run(ctx, as_json, lambda project, emit: command.verify(
        project, names, stores=stores, env_file=env_file, overrides=_overrides(database_url), emit=emit))


@main.command()
@env_option
@click.option("--login", metavar="NAME", help="The existing login (role with LOGIN) the service connects with.")
@click.option("--revoke", is_flag=True, help="Take the login out of the role and reset its search_path.")
@click.option("--store", default="postgres", show_default=True, metavar="STORE",
              help="The store whose access to grant: postgres, redis (the user in REDIS_URL) or mongo "
                   "(the user in MONGODB_URL).")
@click.option("--admin-url", metavar="URL",
              help="redis/mongo: the administrative URL to connect with "
                   "(default: MOMENTRY_REDIS_ADMIN_URL / MOMENTRY_MONGO_ADMIN_URL).")
@json_option
@env_file_option
@url_option
@click.pass_context
def grant(ctx: click.Context, env_name: str, login: str | None, revoke: bool, store: str, admin_url: str | None,
          as_json: bool, env_file: Path | None, database_url: str | None) -> None:
    """Limit a login to the environment: PostgreSQL role membership and search_path '<schema>, public',
    or a Redis ACL / MongoDB user limited to its prefix / database; --revoke undoes it."""
    from . import command

    _run(ctx, as_json, lambda project, emit: command.grant(
        project, env_name, login=login, revoke=revoke, store=store, admin_url=admin_url, env_file=env_file,
        overrides=_overrides(database_url), emit=emit))


@main.command()
@env_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@click.pass_context
def reset(ctx: click.Context, env_name: str, yes: bool, as_json: bool) -> None:
    """Drop and recreate a non-prod environment's stores and Redis keys, then migrate. Never prod."""
    from . import command

    def work(project: Any, emit: Any) -> Any:
        from .errors import RefusedError

        env = command.resettable(project, env_name)
        if not yes:
            if not sys.stdin.isatty():
                raise RefusedError("reset needs --yes when there is no terminal to confirm on")
            answer = click.prompt(f"This drops schema {env.schema}, database {env.mongo_database}, collection "
                                  f"{env.qdrant_collection} and Redis keys {env.redis_prefix}*. "
                                  f"Type {env.name!r} to confirm", default="", show_default=False)
            if answer != env.name:
                raise RefusedError("reset not confirmed; nothing was changed")
        return command.reset(project, env_name, emit=emit)

    _run(ctx, as_json, work)


@main.command()
@env_option
@click.option("--yes", is_flag=True, help="Delete the listed collections; without it prune only lists them.")
@click.option("--confirm", "confirm_name", metavar="NAME",
              help="The environment's name, typed in advance: prod's prune needs it when there is no terminal.")
@json_option
@click.pass_context
def prune(ctx: click.Context, env_name: str, yes: bool, confirm_name: str | None, as_json: bool) -> None:
    """List old Qdrant collections (no alias points at them) with point counts; --yes deletes them."""
    from . import command

    def typed(question: str) -> bool:
        if confirm_name is not None:
            return True  # checked against --env below, before anything is read
        if not sys.stdin.isatty():
            return False
        answer = click.prompt(f"{question}\nType {env_name!r} to confirm", default="", show_default=False, err=True)
        return bool(answer == env_name)

    def work(project: Any, emit: Any) -> Any:
        from .errors import ConfigError

        if confirm_name is not None and confirm_name != env_name:
            raise ConfigError(f"--confirm {confirm_name!r} does not match --env {env_name!r}; nothing was deleted")
        return command.prune(project, env_name, yes=yes, confirm=typed, emit=emit)

    _run(ctx, as_json, work)


@main.command()
@click.option("--from", "source", required=True, metavar="NAME", help="Environment to copy from.")
@click.option("--to", "dest", required=True, metavar="NAME", help="Environment to copy into (never prod).")
@store_option
@click.option("--tables", metavar="T1,T2", help="Only these isolated tables (comma-separated).")
@click.option("--limit", type=click.IntRange(min=0), help="At most this many rows, documents or points each.")
@json_option
@click.pass_context
def clone(ctx: click.Context, source: str, dest: str, stores: tuple[str, ...], tables: str | None,
          limit: int | None, as_json: bool) -> None:
    """Copy data from one environment into another: tables, collections and points."""
    from . import command

    names = [t.strip() for t in tables.split(",") if t.strip()] if tables is not None else None
    _run(ctx, as_json, lambda project, emit: command.clone(
        project, source, dest, stores=stores, tables=names, limit=limit, emit=emit))


@main.command()
@env_option
@click.option("--force", is_flag=True, help="Stamp even when the live schema differs from the models.")
@json_option
@click.pass_context
def adopt(ctx: click.Context, env_name: str, force: bool, as_json: bool) -> None:
    """Take over a schema created outside Alembic: compare it with the models, then stamp it."""
    from . import command

    _run(ctx, as_json, lambda project, emit: command.adopt(project, env_name, force=force, emit=emit))


@main.command("env-file")
@env_option
@click.option("--check", is_flag=True, help="Report differences without writing; exit 1 when there are any.")
@click.option("--path", type=click.Path(dir_okay=False, path_type=Path),
              help="The file to write (default: the environment's, such as .env.development).")
@json_option
@click.pass_context
def env_file_command(ctx: click.Context, env_name: str, check: bool, path: Path | None, as_json: bool) -> None:
    """Write an environment's isolation variables into its env file, keeping everything else."""
    from . import command

    _run(ctx, as_json, lambda project, emit: command.env_file(project, env_name, check=check, path=path))


@main.command()
@json_option
@click.pass_context
def envs(ctx: click.Context, as_json: bool) -> None:
    """List every environment with its schema, database, collection, prefix and directories."""
    from . import command

    _run(ctx, as_json, lambda project, emit: command.envs(project, emit=emit))


@main.command()
@env_option
@click.option("--expires-in", metavar="DURATION",
              help="Lifetime of the token: a number with s, m, h, d or w, such as 30d (default: no expiry).")
@json_option
@click.pass_context
def token(ctx: click.Context, env_name: str, expires_in: str | None, as_json: bool) -> None:
    """Print a Qdrant JWT (signed with QDRANT_API_KEY) granting read-write on the env's collections only."""
    from . import command

    _run(ctx, as_json, lambda project, emit: command.token(project, env_name, expires_in=expires_in, emit=emit))


@main.command()
@read_options
@click.pass_context
def check(ctx: click.Context, env_names: tuple[str, ...], all_envs: bool, stores: tuple[str, ...], as_json: bool, env_file: Path | None,
          database_url: str | None) -> None:
    """Exit 0 when every store is at head and matches its declarations; else 1, naming why (and which env)."""
    from . import command

    names = _chosen_envs(env_names, all_envs, env_file, database_url)
    _run(ctx, as_json, lambda project, emit: command.check(
        project, names, stores=stores, env_file=env_file, overrides=_overrides(database_url), emit=emit))


@main.command()
@envs_option
@all_option
@json_option
@env_file_option
@url_option
@click.pass_context
def lint(ctx: click.Context, env_names: tuple[str, ...], all_envs: bool, as_json: bool, env_file: Path | None,
         database_url: str | None) -> None:
    """Report risky DDL in the pending revisions (squawk); exit 1 when there is any, naming the env."""
    from . import command

    names = _chosen_envs(env_names, all_envs, env_file, database_url)
    _run(ctx, as_json, lambda project, emit: command.lint(
        project, names, env_file=env_file, overrides=_overrides(database_url), emit=emit))


@main.command()
@env_option
@click.option("--to", "revision", required=True, metavar="REV", help="Revision to go down to (base for none).")
@click.option("--yes", is_flag=True,
              help="Consent without being asked (needed for prod, and wherever a table holds rows).")
@lock_timeout_option
@json_option
@click.pass_context
def downgrade(ctx: click.Context, env_name: str, revision: str, yes: bool, lock_timeout: float,
              as_json: bool) -> None:
    """Downgrade one environment's PostgreSQL schema; prod, or tables holding rows, need consent."""
    from . import command

    _run(ctx, as_json, lambda project, emit: command.downgrade(
        project, env_name, revision, consent=_consent(yes), emit=emit, lock_timeout=lock_timeout))


@main.command()
@envs_option
@all_option
@store_option
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Newest entries shown.")
@json_option
@click.pass_context
def history(ctx: click.Context, env_names: tuple[str, ...], all_envs: bool, stores: tuple[str, ...], limit: int,
            as_json: bool) -> None:
    """Show what was applied to one environment or several: time, store, step, duration and outcome."""
    from . import command

    names = _chosen_envs(env_names, all_envs)
    _run(ctx, as_json, lambda project, emit: command.history(project, names, limit=limit, stores=stores,
                                                             emit=emit))


@main.command()
@env_option
@click.option("--store", required=True, type=click.Choice(["postgres", "mongo", "qdrant"]),
              help="The store whose migration lock to show and release.")
@click.option("--yes", is_flag=True, help="Release the lock shown (otherwise only show it, and exit 2).")
@json_option
@click.pass_context
def unlock(ctx: click.Context, env_name: str, store: str, yes: bool, as_json: bool) -> None:
    """Show who holds an environment's migration lock in one store; release it with --yes."""
    from . import command

    _run(ctx, as_json, lambda project, emit: command.unlock(project, env_name, store, yes=yes, emit=emit))


@main.group()
def embedded() -> None:
    """Manage the embedded servers used when DATABASE_URL or MONGODB_URL is not set."""


@embedded.command("status")
@json_option
@click.pass_context
def embedded_status(ctx: click.Context, as_json: bool) -> None:
    """List the embedded PostgreSQL and MongoDB servers: address, data directory, pid, state."""
    from . import command

    _run(ctx.find_root(), as_json, lambda project, emit: command.embedded_status(project))


@embedded.command("stop")
@json_option
@click.pass_context
def embedded_stop(ctx: click.Context, as_json: bool) -> None:
    """Stop the embedded PostgreSQL and MongoDB servers."""
    from . import command

    _run(ctx.find_root(), as_json, lambda project, emit: command.stop_embedded(project))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

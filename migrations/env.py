"""Alembic entry point: resolve the targets, then run each schema on its own.

``alembic -x schema=dev upgrade head`` migrates dev only; with no ``-x``, every
configured environment is migrated, public first, on the path ``momentry-db migrate
--all`` takes (schemas at the same revision run one compiled script each).
momentry-db passes its targets in ``config.attributes`` instead.
"""

import sys
from logging.config import fileConfig
from pathlib import Path

from alembic import context

from momentry_db.errors import MomentryError
from momentry_db.stores import postgres

config = context.config
targets = config.attributes.get("momentry_targets")

if targets is None:  # a plain `alembic` call
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    from momentry_db.settings import load_project

    from momentry_db.environments import scrub

    secrets = []
    try:
        root = Path(config.config_file_name).resolve().parent if config.config_file_name else None
        project = load_project(root)
        secrets = project.secrets()
        config.attributes["momentry_project"] = project
        postgres.check_revisions(context.script)  # a broken or branched history stops before any connection
        x_args = context.get_x_argument(as_dictionary=True)
        targets = postgres.targets_from_x_args(project, x_args)
        postgres.refuse_unconfirmed_downgrade(context, targets, x_args)
        cmd = getattr(config.cmd_opts, "cmd", None)
        upgrading = not context.is_offline_mode() and cmd and getattr(cmd[0], "__name__", "") == "upgrade"
        if upgrading and "schema" not in x_args and postgres.to_head(context):
            results = postgres.upgrade_all(context, targets)  # every environment: migrate's fast path
        else:
            results = postgres.run_env(context, targets)
        if upgrading:
            from momentry_db.stores.postgres.grants import ensure_grants

            upgraded = {schema for schema, ran in results.items() if ran.applied}
            streamed = config.attributes.get(postgres.STREAMED)  # made while the schemas ran
            for notice in ensure_grants(targets, project.environments(), changed=upgraded,  # as migrate keeps them
                                        streamed=streamed):
                print(notice, file=sys.stderr)
    except MomentryError as exc:
        print(f"error: {scrub(str(exc), secrets)}", file=sys.stderr)
        sys.exit(exc.exit_code)
else:
    postgres.run_env(context, targets)

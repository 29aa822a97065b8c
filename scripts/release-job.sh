#!/usr/bin/env bash
# Release job: check -> lint -> migrate prod -> check again. Run from the project root with momentry-db on PATH.
# Connection settings come from the pipeline's secret store as environment variables
# (DATABASE_URL, MONGODB_URL, QDRANT_URL, QDRANT_API_KEY, REDIS_URL); nothing is written to disk.
# Exit 0: prod is at head. Exit 1: drift, risky DDL awaiting approval, or a failed step. Exit 2: bad
# configuration, an unreachable PostgreSQL, or a refused command.
set -uo pipefail
: "${DATABASE_URL:?DATABASE_URL must be set from the pipeline secret store}"

run() { echo "+ momentry-db $*" >&2; momentry-db "$@"; }

run check --env prod --json > check.json
code=$?
case $code in
  0) echo "prod is at head and matches the models; nothing to migrate"; exit 0 ;;
  1) ;;  # pending steps, drift, or both: look closer
  *) echo "check failed (exit $code): configuration or connection problem" >&2; exit "$code" ;;
esac
if ! python3 -c 'import json, sys; sys.exit(1 if json.load(open("check.json"))["drift"] else 0)'; then
  echo "prod's live schema has drifted from the models (see check.json); fix that before deploying" >&2
  exit 1
fi

accept=()
run lint --env prod
code=$?
if [ "$code" -eq 1 ]; then
  if [ "${MOMENTRY_ACCEPT_RISKY:-}" = "1" ]; then
    accept=(--accept-risky)  # a reviewer approved the risky statements listed above
  else
    echo "risky DDL needs a reviewer: approve, then rerun with MOMENTRY_ACCEPT_RISKY=1" >&2
    exit 1
  fi
elif [ "$code" -ne 0 ]; then
  exit "$code"
fi

run migrate --env prod --json "${accept[@]}" > migrate.json
code=$?
if [ "$code" -ne 0 ]; then
  echo "migrate failed (exit $code); earlier stores keep what they applied, a rerun resumes" >&2
  exit "$code"
fi

# At head now, so check compares the live schema with the models as well.
run check --env prod --json > check-after.json
code=$?
if [ "$code" -ne 0 ]; then
  echo "prod is not clean after migrating (see check-after.json)" >&2
fi
exit "$code"

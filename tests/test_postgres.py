"""Per-schema migrations on real PostgreSQL: what lands in the catalogs, what stays untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from momentry_db.models import metadata
from momentry_db.tables import BOOKKEEPING_TABLES as BOOKKEEPING
from momentry_db.tables import isolated_tables, shared_tables, view_names
from tests.helpers import clean_environ

ISOLATED = {"videos", "chunks", "pre_chunks", "chunk_vectors", "frames", "processor_results",
            "file_registry", "file_lifecycle", "face_clusters", "face_detections", "face_identities",
            "face_recognition_results"}
VIEWS = {"v_idle_workflows", "v_recent_anomalies", "v_service_health", "v_storage_overview"}


def test_registry_matches_the_design() -> None:
    assert isolated_tables() == ISOLATED
    assert view_names() == VIEWS
    prefixes = ("api_key", "monitor_", "backup_", "node_", "python_", "storage_")
    assert all(t.startswith(prefixes) or t in {"gitea_tokens", "n8n_api_keys"} for t in shared_tables())
    assert {"api_keys", "api_key_audit_log", "api_key_anomalies", "gitea_tokens", "n8n_api_keys"} <= shared_tables()


def test_dev_holds_exactly_the_isolated_tables_and_public_holds_everything(migrated, database) -> None:
    assert database.tables("dev") == ISOLATED | BOOKKEEPING
    assert database.tables("public") == ISOLATED | shared_tables() | BOOKKEEPING
    assert database.tables("public", "VIEW") == VIEWS


def test_no_view_exists_outside_public(migrated, database) -> None:
    rows = database.query("SELECT schemaname, viewname FROM pg_views "
                          "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')")
    assert {r[0] for r in rows} == {"public"}
    assert {r[1] for r in rows} == VIEWS


def test_dev_foreign_keys_stay_in_dev(migrated, database) -> None:
    rows = database.query("""
        SELECT c.conname, src.nspname, dst.nspname
        FROM pg_constraint c
        JOIN pg_class s ON s.oid = c.conrelid JOIN pg_namespace src ON src.oid = s.relnamespace
        JOIN pg_class d ON d.oid = c.confrelid JOIN pg_namespace dst ON dst.oid = d.relnamespace
        WHERE c.contype = 'f' AND src.nspname IN ('public', 'dev')""")
    dev_fks = [r for r in rows if r[1] == "dev"]
    isolated_fks = {c.name for t in metadata.tables.values() if t.name in isolated_tables()
                    for c in t.foreign_key_constraints}
    assert sorted(r[0] for r in dev_fks) == sorted(isolated_fks)
    assert all(r[2] == "dev" for r in dev_fks)
    assert all(r[2] == "public" for r in rows if r[1] == "public")


STRUCTURE = {
    "columns": """SELECT table_name, column_name, data_type, udt_name, is_nullable, column_default,
                         character_maximum_length, numeric_precision, is_identity
                  FROM information_schema.columns WHERE table_schema = %s""",
    "indexes": """SELECT tablename, indexname, replace(indexdef, ' ' || schemaname || '.', ' ')
                  FROM pg_indexes WHERE schemaname = %s""",
    "constraints": """SELECT cl.relname, c.conname, c.contype, pg_get_constraintdef(c.oid)
                      FROM pg_constraint c JOIN pg_class cl ON cl.oid = c.conrelid
                      JOIN pg_namespace n ON n.oid = cl.relnamespace WHERE n.nspname = %s""",
}


@pytest.mark.parametrize("aspect", sorted(STRUCTURE))
def test_dev_tables_have_the_same_structure_as_public(migrated, database, aspect: str) -> None:
    def of(schema: str) -> set[tuple]:
        # Qualified names in definitions differ by schema only; compare them unqualified.
        rows = database.query(STRUCTURE[aspect], (schema,))
        return {tuple(str(v).replace(f"{schema}.", "") if v is not None else None for v in r)
                for r in rows if r[0] in ISOLATED}

    public, dev = of("public"), of("dev")
    assert public, f"no {aspect} found"
    assert dev == public


def test_dev_upgrade_and_downgrade_leave_public_byte_identical(project, database) -> None:
    assert project.cli("migrate", "--env", "prod").code == 0
    before = database.dump_schema("public")
    up = project.alembic("-x", "schema=dev", "upgrade", "head")
    assert up.code == 0, up.err
    assert database.tables("dev") == ISOLATED | BOOKKEEPING
    down = project.alembic("-x", "schema=dev", "downgrade", "base")
    assert down.code == 0, down.err
    assert database.tables("dev") == BOOKKEEPING
    assert database.dump_schema("public") == before


def test_plain_alembic_upgrade_migrates_public_then_every_environment(project, database) -> None:
    (project.root / "momentry-db.toml").write_text('[environments]\nstaging = {}\n')
    result = project.alembic("upgrade", "head")
    assert result.code == 0, result.err
    assert database.tables("staging") == ISOLATED | BOOKKEEPING
    assert database.tables("dev") == ISOLATED | BOOKKEEPING
    assert "v_service_health" in database.tables("public", "VIEW")
    order = [line for line in result.err.splitlines() if "Running upgrade" in line]
    assert len(order) == 3


def test_x_schema_accepts_only_configured_schemas(project, database) -> None:
    result = project.alembic("-x", "schema=other", "upgrade", "head")
    assert result.code == 2
    assert "not the schema of a configured environment" in result.err
    assert "Traceback" not in result.err
    assert database.query("SELECT nspname FROM pg_namespace WHERE nspname = 'other'") == []


def test_status_reports_current_and_pending(project) -> None:
    before = json.loads(project.cli("status", "--env", "dev", "--json").out)
    assert before["targets"][0]["current"] == [] and before["targets"][0]["pending"][0]["name"] == "0001"
    assert project.cli("migrate", "--env", "dev").code == 0
    after = project.cli("status", "--env", "dev")
    assert after.code == 0
    assert "current 0001, head 0001; up to date" in after.out


def test_second_migrate_has_nothing_to_do(project, database) -> None:
    first = project.cli("migrate", "--env", "dev", "--store", "postgres", "--json")
    before = database.dump_schema("dev"), database.query("SELECT * FROM dev.momentry_history ORDER BY id")
    second = project.cli("migrate", "--env", "dev", "--store", "postgres", "--json")
    assert (first.code, second.code) == (0, 0)
    assert [s["name"] for s in json.loads(first.out)["applied"]] == ["0001"]
    assert json.loads(second.out)["applied"] == []
    assert (database.dump_schema("dev"), database.query("SELECT * FROM dev.momentry_history ORDER BY id")) == before


def test_concurrent_migrations_of_one_schema_apply_each_revision_once(project, database) -> None:
    def run(_: int):
        return project.momentry_db("migrate", "--env", "dev", "--json")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    assert all(r.code == 0 for r in results), [r.err for r in results]
    applied = sorted((s["store"], s["name"]) for r in results for s in json.loads(r.out)["applied"])
    assert applied == [("postgres", "0001"), ("qdrant", "create")]
    assert database.query("SELECT version_num FROM dev.alembic_version") == [("0001",)]


def test_dry_run_sql_matches_alembic_and_runs_under_psql(project, database, tmp_path: Path) -> None:
    dry = project.cli("migrate", "--env", "dev", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    sql = json.loads(dry.out)["targets"][0]["sql"]
    offline = project.alembic("-x", "schema=dev", "upgrade", "head", "--sql")
    assert offline.code == 0, offline.err
    assert offline.out == sql
    assert database.query("SELECT nspname FROM pg_namespace WHERE nspname = 'dev'") == []  # wrote nothing
    script = tmp_path / "dev.sql"
    script.write_text(sql)
    applied = database.psql_file(script)
    assert applied.returncode == 0, applied.stderr
    assert database.tables("dev") == ISOLATED | {"alembic_version"}
    assert project.cli("status", "--env", "dev", "--store", "postgres").out.strip().endswith("up to date")


def test_dry_run_text_shows_the_sql_per_schema(project) -> None:
    result = project.cli("migrate", "--env", "dev", "--dry-run")
    assert result.code == 0
    assert "-- postgres dev (schema dev): would apply 0001 (initial schema)" in result.out
    assert 'SET search_path TO "dev";' in result.out
    assert "CREATE TABLE videos" in result.out


def test_a_fresh_project_with_no_servers_configured(tmp_path: Path, traversable_tmp: Path) -> None:
    """The README's first command: embedded PostgreSQL and MongoDB, Qdrant in local mode."""
    root = tmp_path / "fresh"
    root.mkdir()
    env = {**clean_environ(), "MOMENTRY_STATE_DIR": str(traversable_tmp / "state")}
    cli = [sys.executable, "-m", "momentry_db.cli", "--project-dir", str(root)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=120)

    try:
        first = run("migrate", "--env", "dev")
        assert first.returncode == 0, first.stderr
        assert first.stderr.count("using the embedded server") == 2  # PostgreSQL and MongoDB
        assert "mongo: skipped" not in first.stderr
        assert "postgres dev (schema dev): upgraded to 0001" in first.stdout
        assert "mongo dev (database momentry_dev): applied 0002_cache" in first.stdout
        assert "qdrant dev (collection momentry_dev_rule1): applied create" in first.stdout
        second = run("migrate", "--env", "dev")
        assert second.returncode == 0
        assert "done: 1 environment(s), 3 target(s): 0 upgraded, 3 up to date, 0 failed" in second.stdout
        status = run("status", "--env", "dev", "--json")
        body = json.loads(status.stdout)
        assert [(t["store"], t["pending"]) for t in body["targets"]] == [("postgres", []), ("mongo", []),
                                                                         ("qdrant", [])]
        assert body["skipped"] == []
        assert (traversable_tmp / "state" / "pg" / "PG_VERSION").exists()
        assert (traversable_tmp / "state" / "mongo" / "data").is_dir()
    finally:
        run("embedded", "stop")
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(traversable_tmp / "state" / "qdrant"))
    try:
        vectors = client.get_collection("momentry_dev_rule1").config.params.vectors
        assert (vectors.size, vectors.distance.value) == (1024, "Cosine")
    finally:
        client.close()


def test_targets_put_public_first_whatever_the_order_given(tmp_path: Path) -> None:
    from momentry_db.settings import load_project
    from momentry_db.stores.postgres import targets_for

    proj = load_project(tmp_path, {"MOMENTRY_EXTRA_ENVS": "staging,pr-1"})
    envs = [proj.environment(n) for n in ("staging", "dev", "prod", "pr-1")]
    assert [t.schema for t in targets_for(envs)] == ["public", "staging", "dev", "pr_1"]
    assert [t.schema for t in targets_for(list(reversed(envs)))] == ["public", "pr_1", "dev", "staging"]

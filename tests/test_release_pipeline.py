"""The release job documented in docs/release-pipeline.md, run against a real database."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, clean_environ, plant

SCRIPT = REPO / "scripts" / "release-job.sh"


def run_job(project, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**clean_environ(), **project.environ, **extra,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", str(SCRIPT)], cwd=project.root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_doc_shows_exactly_the_tested_script() -> None:
    doc = (REPO / "docs" / "release-pipeline.md").read_text()
    shown = re.search(r"<!-- begin scripts/release-job.sh -->\n```bash\n(.*?)```\n<!-- end", doc, re.S)
    assert shown and shown.group(1) == SCRIPT.read_text()
    assert "secrets.MOMENTRY_DATABASE_URL" in doc and "Gitea Actions" in doc and "GitHub Actions" in doc


def test_the_job_migrates_a_fresh_prod_then_finds_nothing_to_do(project, database) -> None:
    first = run_job(project)
    assert first.returncode == 0, first.stderr
    assert "+ momentry-db check --env prod --json" in first.stderr
    assert "+ momentry-db lint --env prod" in first.stderr
    report = json.loads((project.root / "migrate.json").read_text())
    assert report["ok"] is True and [s["name"] for s in report["applied"] if s["store"] == "postgres"] == ["0001"]
    assert database.query("SELECT version_num FROM public.alembic_version") == [("0001",)]
    second = run_job(project)
    assert second.returncode == 0
    assert "nothing to migrate" in second.stdout
    assert "+ momentry-db lint" not in second.stderr


def test_the_job_stops_on_drift_without_migrating(migrated, database) -> None:
    assert run_job(migrated).returncode == 0  # at head: nothing to do
    database.execute("ALTER TABLE public.videos ADD COLUMN by_hand text")
    result = run_job(migrated)
    assert result.returncode == 1
    assert "drifted from the models" in result.stderr
    assert "+ momentry-db migrate" not in result.stderr


def test_the_job_waits_for_approval_of_risky_ddl(migrated, database, tmp_path: Path) -> None:
    project = migrated  # prod at head
    # Rebuild an index the plain way: the same schema afterwards, but writes block meanwhile.
    plant(project, tmp_path, 'op.drop_index("ix_videos_status", table_name="videos")\n'
                             'op.create_index("ix_videos_status", "videos", ["status"])', doc="rebuild index")

    waiting = run_job(project)
    assert waiting.returncode == 1
    assert "non-concurrent index on an existing table" in waiting.stdout
    assert "needs a reviewer" in waiting.stderr
    assert database.query("SELECT version_num FROM public.alembic_version") == [("0001",)]
    approved = run_job(project, MOMENTRY_ACCEPT_RISKY="1")
    assert approved.returncode == 0, approved.stderr
    assert database.query("SELECT version_num FROM public.alembic_version") == [("0002",)]


def test_the_job_refuses_to_run_without_a_database_url(project) -> None:
    env = {k: v for k, v in project.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(["bash", str(SCRIPT)], cwd=project.root, capture_output=True, text=True,
                            env={**clean_environ(), **env})
    assert result.returncode == 1
    assert "DATABASE_URL must be set from the pipeline secret store" in result.stderr

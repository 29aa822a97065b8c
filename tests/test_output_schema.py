"""Every command's --json output validates against docs/output.schema.json, the shipped contract."""

from __future__ import annotations

import json

import jsonschema
import pytest

from .helpers import REPO, document

SCHEMA = json.loads((REPO / "docs" / "output.schema.json").read_text())


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_one_environment_is_the_one_element_case_of_several(project) -> None:
    project.environ["MOMENTRY_EXTRA_ENVS"] = "pr-1,pr-2"
    dry = document(project.cli("migrate", "--env", "dev", "--dry-run", "--json"))
    assert dry["dry_run"] is True and {t["outcome"] for t in dry["targets"]} == {"would apply"}
    plan = document(project.cli("plan", "--env", "prod", "--json"))
    assert plan["envs"] == ["prod"] and plan["dry_run"] is True
    one = document(project.cli("migrate", "--env", "dev", "--json"))
    several = document(project.cli("migrate", "--env", "prod", "--env", "pr-1", "--json"))
    every = document(project.cli("migrate", "--all", "--parallel", "2", "--json"))
    assert set(one) == set(several) == set(every)
    assert (one["envs"], several["envs"], every["envs"]) == (["dev"], ["prod", "pr-1"], ["prod", "dev", "pr-1", "pr-2"])
    assert [(t["store"], t["env"], t["outcome"]) for t in one["targets"]] == [
        ("postgres", "dev", "upgraded"), ("qdrant", "dev", "upgraded")]
    assert [(t["store"], t["env"], t["outcome"]) for t in every["targets"]] == [
        ("postgres", "prod", "up to date"), ("postgres", "dev", "up to date"), ("postgres", "pr-1", "up to date"),
        ("postgres", "pr-2", "upgraded"), ("qdrant", "prod", "up to date"), ("qdrant", "dev", "up to date"),
        ("qdrant", "pr-1", "up to date"), ("qdrant", "pr-2", "upgraded")]
    assert every["summary"] == {"upgraded": 2, "up to date": 6, "failed": 0, "refused": 0}
    status = document(project.cli("status", "--env", "dev", "--json"))
    assert {t["outcome"] for t in status["targets"]} == {"up to date"}


def test_every_other_command_prints_a_document_of_the_schema(migrated, database) -> None:
    project = migrated
    for args, code in [
        (("check", "--env", "dev"), 0), (("verify", "--env", "dev", "--store", "postgres"), 0),
        (("lint", "--env", "dev"), 0), (("history", "--env", "dev"), 0), (("envs",), 0),
        (("env-file", "--env", "dev", "--check"), None), (("unlock", "--env", "dev", "--store", "postgres"), 0),
        (("clone", "--from", "prod", "--to", "dev", "--store", "postgres"), 0), (("prune", "--env", "dev"), 0),
        (("adopt", "--env", "dev"), 0), (("downgrade", "--env", "dev", "--to", "base", "--yes"), 0),
        (("reset", "--env", "dev", "--yes"), 0), (("embedded", "status"), 0), (("embedded", "stop"), 0),
    ]:
        doc = document(project.cli(*args, "--json"), code)
        assert doc["version"] == 2


@pytest.mark.parametrize("args", [
    ("migrate",), ("migrate", "--all", "--dry-run"), ("migrate", "--env", "nowhere"), ("status", "--env", "Bad Name"),
    ("migrate", "--env", "prod", "--env", "dev", "--database-url", "postgresql://x@127.0.0.1:1/db"),
])
def test_errors_print_the_error_document(project, args) -> None:
    doc = document(project.cli(*args, "--json"), 2)
    assert doc["ok"] is False and doc["error"]["exit_code"] == 2


def test_read_commands_take_several_environments_and_all(migrated, database) -> None:
    project = migrated
    project.environ["MOMENTRY_EXTRA_ENVS"] = "pr-1"
    status = document(project.cli("status", "--all", "--json"))
    assert status["envs"] == ["prod", "dev", "pr-1"]
    assert {(t["env"], t["outcome"]) for t in status["targets"] if t["store"] == "postgres"} == {
        ("prod", "up to date"), ("dev", "up to date"), ("pr-1", "pending")}
    matrix = project.cli("status", "--all", "--store", "postgres")
    assert matrix.code == 0, matrix.err
    assert matrix.out.splitlines() == ["env   postgres", "prod  0001", "dev   0001", "pr-1  base (+1 pending)",
                                       "status: 3 environment(s), 1 behind: pr-1"]
    plan = document(project.cli("plan", "--env", "dev", "--env", "pr-1", "--store", "postgres", "--json"))
    assert [t["outcome"] for t in plan["targets"]] == ["up to date", "would apply"]
    check = document(project.cli("check", "--all", "--store", "postgres", "--json"), 1)
    assert (check["envs"], check["failed"]) == (["prod", "dev", "pr-1"], ["pr-1"])
    text = project.cli("check", "--all", "--store", "postgres")
    assert text.code == 1 and text.out.splitlines()[-1] == "check: 1 of 3 environment(s) failed: pr-1"
    verify = document(project.cli("verify", "--env", "prod", "--env", "pr-1", "--store", "postgres", "--json"), 1)
    assert verify["envs"] == ["prod", "pr-1"] and verify["failed"] == ["pr-1"]
    assert {c["env"] for c in verify["checks"]} == {"prod", "pr-1"}
    text = project.cli("verify", "--all", "--store", "postgres")
    assert text.code == 1 and text.out.splitlines()[-1] == "verify: 3 environment(s), 1 failed: pr-1"
    one = document(project.cli("verify", "--env", "dev", "--store", "postgres", "--json"))
    assert (one["envs"], one["failed"]) == (["dev"], [])
    history = document(project.cli("history", "--all", "--store", "postgres", "--json"))
    assert history["envs"] == ["prod", "dev", "pr-1"] and {e["env"] for e in history["history"]} == {"prod", "dev"}
    lint = document(project.cli("lint", "--all", "--json"))
    assert (lint["envs"], lint["failed"], [s["env"] for s in lint["pending"]]) == (["prod", "dev", "pr-1"], [], ["pr-1"])
    usage = document(project.cli("status", "--all", "--database-url", "postgresql://u@127.0.0.1:1/db", "--json"), 2)
    assert "take one --env" in usage["error"]["message"]


def test_grant_prints_a_document_of_the_schema(granted) -> None:
    project = granted.project
    done = document(project.cli("grant", "--env", "dev", "--login", granted.login, "--json"))
    assert (done["command"], done["login"], done["role"], done["revoke"], done["search_path"]) == (
        "grant", granted.login, granted.roles["dev"], False, "dev, public")
    undone = document(project.cli("grant", "--env", "dev", "--login", granted.login, "--revoke", "--json"))
    assert (undone["revoke"], undone["search_path"], len(undone["changed"])) == (True, None, 2)
    refused = document(project.cli("grant", "--env", "dev", "--login", "Bad Name", "--json"), 2)
    assert refused["error"]["type"] == "ConfigError"


def test_the_token_document(tmp_path) -> None:
    from .helpers import NO_EMBEDDED, Project

    key = "0123456789abcdef" * 3
    project = Project(tmp_path, {**NO_EMBEDDED, "MOMENTRY_STATE_DIR": str(tmp_path / ".state"), "QDRANT_API_KEY": key})
    forever = document(project.cli("token", "--env", "dev", "--json"))
    bounded = document(project.cli("token", "--env", "prod", "--expires-in", "30d", "--json"))
    assert (forever["env"], forever["access"], forever["expires_at"]) == (
        "dev", [{"collection": "momentry_dev_rule1", "access": "rw"}], None)
    assert (bounded["env"], bounded["access"]) == ("prod", [{"collection": "momentry_rule1", "access": "rw"}])
    assert bounded["expires_at"].endswith("+00:00") and len(forever["notices"]) == 1 and bounded["notices"] == []
    missing = document(project.cli("token", "--env", "dev", "--json", env={"QDRANT_API_KEY": ""}), 2)
    assert missing["error"] == {"type": "ConfigError", "exit_code": 2,
                                "message": "QDRANT_API_KEY is not set for dev; a token is signed with the server's API key"}

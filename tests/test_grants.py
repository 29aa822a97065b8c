"""Privilege isolation in PostgreSQL: each environment's group role, the logins granted to it, and
verify's proof, tested as the service would meet them: logged in as a granted login."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from momentry_db.environments import EnvSpec, Registry, validate_role
from momentry_db.errors import ConfigError
from momentry_db.settings import load_project
from momentry_db.tables import isolated_tables, shared_tables, view_names
from tests.helpers import Granted, as_login, plant

DENIED = psycopg.errors.InsufficientPrivilege


def _members(granted: Granted) -> set[tuple[str, str]]:
    """(group role, member) for every role of this test."""
    return set(granted.database.query(
        "SELECT g.rolname, m.rolname FROM pg_auth_members a JOIN pg_roles g ON g.oid = a.roleid "
        "JOIN pg_roles m ON m.oid = a.member WHERE g.rolname = ANY(%s) OR m.rolname = ANY(%s)",
        (granted.created, granted.created)))


def _settings(granted: Granted) -> set[tuple[str, tuple[str, ...]]]:
    return {(r[0], tuple(r[1])) for r in granted.database.query(
        "SELECT r.rolname, s.setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
        "WHERE r.rolname = ANY(%s)", (granted.created,))}


def _acls(granted: Granted) -> list[tuple]:
    """Every privilege, and the version of the catalog row that holds them, of public's and dev's relations."""
    return granted.database.query(
        "SELECT n.nspname, c.relname, ARRAY(SELECT x::text FROM unnest(c.relacl) x ORDER BY 1), c.xmin::text "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname IN ('public', 'dev') "
        "ORDER BY 1, 2")


def _verify(granted: Granted, env: str = "dev") -> tuple[int, dict[str, str]]:
    result = granted.project.cli("verify", "--env", env, "--store", "postgres", "--json")
    doc = json.loads(result.out)
    return result.code, {c["name"]: c["detail"] for c in doc["checks"] if c["status"] == "fail"}


# --- names -----------------------------------------------------------------------------------


def test_each_environment_has_a_role_named_after_its_root() -> None:
    assert [s.default_role() for s in (EnvSpec("prod"), EnvSpec("dev"), EnvSpec("pr-42"))] == [
        "momentry_app", "momentry_dev_app", "momentry_pr_42_app"]
    assert EnvSpec("dev", role="playground").default_role() == "playground"
    with pytest.raises(ConfigError, match="would share the PostgreSQL role 'shared'"):
        Registry().with_declared([EnvSpec("staging", role="shared"), EnvSpec("qa", role="shared")])


@pytest.mark.parametrize("name, message", [
    ("Robert", "invalid role name 'Robert'"), ("x; DROP TABLE videos", "invalid role name"),
    ('a"b', "invalid role name"), ("", "invalid role name"), ("a" * 64, "longer than PostgreSQL's 63 bytes"),
    ("pg_monitor", "reserved by PostgreSQL"), ("public", "reserved by PostgreSQL"),
    ("current_user", "reserved by PostgreSQL"),
])
def test_a_role_name_is_a_plain_postgresql_identifier(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_role(name)
    assert validate_role("a" * 63) == "a" * 63


def test_the_role_key_of_momentry_db_toml(tmp_path) -> None:
    (tmp_path / "momentry-db.toml").write_text('[environments]\nprod = { role = "app_prod" }\n'
                                               'dev = { role = "app_dev" }\n"pr-42" = {}\n')
    project = load_project(tmp_path, {})
    assert [project.environment(n).pg_role for n in ("prod", "dev", "pr-42")] == [
        "app_prod", "app_dev", "momentry_pr_42_app"]
    for body, message in [('dev = { role = "Dev-App" }', "[environments.dev]: invalid role name 'Dev-App'"),
                          ('dev = { role = 42 }', "role must be a str"),
                          ('prod = { role = "p", schema = "public" }', "only its role may be set")]:
        (tmp_path / "momentry-db.toml").write_text(f"[environments]\n{body}\n")
        with pytest.raises(ConfigError) as caught:
            load_project(tmp_path, {})
        assert message in str(caught.value)


def test_a_bad_role_in_the_config_is_exit_2_before_any_connection(bare_project, silent_server) -> None:
    port, accepted = silent_server
    (bare_project.root / "momentry-db.toml").write_text('[environments]\ndev = { role = "pg_dev" }\n')
    result = bare_project.cli("migrate", "--env", "dev", "--store", "postgres",
                              "--database-url", f"postgresql://u@127.0.0.1:{port}/db")
    assert result.code == 2 and accepted == []
    assert result.err.splitlines() == [
        "error: momentry-db.toml [environments.dev]: role name 'pg_dev' is reserved by PostgreSQL"]


# --- what a granted login can and cannot reach ---------------------------------------------------


def test_a_login_granted_to_dev_works_in_dev_and_never_reaches_prod(granted: Granted) -> None:
    db, project = granted.database, granted.project
    result = project.cli("grant", "--env", "dev", "--login", granted.login)
    assert result.code == 0, result.err
    assert result.out.splitlines() == [f"postgres dev: login {granted.login}: added to role "
                                       f"{granted.roles['dev']}; search_path set to dev, public"]
    db.execute("INSERT INTO public.api_keys (name, key_hash) VALUES ('shared key', 'h1')")
    with granted.connect() as conn:
        assert conn.execute("SHOW search_path").fetchone() == ("dev, public",)
        conn.execute("INSERT INTO videos (title, source_path) VALUES ('mine', '/v/1')")
        assert conn.execute("SELECT name FROM api_keys").fetchall() == [("shared key",)]
        conn.execute("INSERT INTO api_keys (name, key_hash, environment) VALUES ('dev key', 'h2', 'dev')")
        for statement in ["SELECT * FROM public.videos", "SELECT * FROM public.chunks",
                          "INSERT INTO public.videos (source_path) VALUES ('/p')", "UPDATE public.chunks SET id = id",
                          "DELETE FROM public.videos", "TRUNCATE public.chunks",
                          "CREATE TABLE public.planted (id int)"]:
            with pytest.raises(DENIED, match="permission denied"):
                conn.execute(statement)
        for table in ("public.videos", "public.chunks"):
            with pytest.raises(DENIED, match="must be owner"):
                conn.execute(f"DROP TABLE {table}")
    assert db.query("SELECT title FROM dev.videos") == [("mine",)]
    assert db.query("SELECT count(*) FROM public.videos") == [(0,)]
    assert db.query("SELECT name, environment FROM public.api_keys ORDER BY id") == [
        ("shared key", "prod"), ("dev key", "dev")]
    assert db.tables("public") >= {"videos", "chunks"} and "planted" not in db.tables("public")

    # No fall-through: without dev.frames, an unqualified frames resolves to public.frames and is refused.
    db.execute("DROP TABLE dev.frames CASCADE")
    with granted.connect() as conn:
        for statement in ["SELECT * FROM frames",
                          "INSERT INTO frames (video_id, frame_number, timestamp_seconds) VALUES (1, 1, 0)"]:
            with pytest.raises(DENIED, match="permission denied for table frames"):
                conn.execute(statement)
    assert db.query("SELECT count(*) FROM public.frames") == [(0,)]
    code, failed = _verify(granted)
    assert code == 1 and failed == {
        "dev holds every isolated table": "isolated table frames missing from dev",
        "dev tables have public's structure": "face_detections: constraint fk_face_detections_frame_id_frames "
                                              "missing in dev"}


def test_migrate_revokes_what_undoes_isolation_and_writes_nothing_when_current(granted: Granted) -> None:
    db, project, role = granted.database, granted.project, granted.roles["dev"]
    before = _acls(granted)
    again = project.cli("migrate", "--env", "dev", "--store", "postgres")
    assert again.code == 0 and again.err == ""
    assert _acls(granted) == before  # a no-op run rewrites no privilege list, not even in place
    # By hand: PUBLIC may create in public (PostgreSQL before 15 grants it), dev's role may read prod's
    # videos, and it lost a shared table.
    db.execute(f"GRANT CREATE ON SCHEMA public TO PUBLIC; GRANT SELECT, UPDATE ON public.videos TO {role}; "
               f"REVOKE ALL ON public.api_keys FROM {role}")
    result = project.cli("migrate", "--env", "dev", "--store", "postgres")
    assert result.code == 0, result.err
    assert result.err.splitlines() == [f"postgres dev: role {role}: CREATE on schema public revoked from PUBLIC; "
                                       "4 privilege(s) granted, 2 privilege(s) on public's isolated tables revoked"]
    assert [a[:3] for a in _acls(granted)] == [a[:3] for a in before]
    assert db.query("SELECT has_schema_privilege('public', 'public', 'CREATE')") == [(False,)]
    assert db.query(f"SELECT has_table_privilege('{role}', 'public.videos', 'SELECT'), "
                    f"has_table_privilege('{role}', 'public.api_keys', 'INSERT')") == [(False, True)]
    # prod's run keeps the other roles current on the shared tables it owns.
    db.execute(f"REVOKE ALL ON public.monitor_alerts FROM {role}")
    result = project.cli("migrate", "--env", "prod", "--store", "postgres")
    assert result.code == 0, result.err
    assert result.err.splitlines() == [f"postgres prod: role {granted.roles['prod']}: {role} (dev): "
                                       "4 privilege(s) granted"]
    assert [a[:3] for a in _acls(granted)] == [a[:3] for a in before]


def test_grant_refuses_bad_names_unknown_logins_and_a_second_environment(granted: Granted, silent_server) -> None:
    project = granted.project
    port, accepted = silent_server
    for name in ["Robert", "x; DROP TABLE videos", 'svc"; --', "pg_read_all_data", "a" * 64, ""]:
        result = project.cli("grant", "--env", "dev", "--login", name,
                             "--database-url", f"postgresql://u@127.0.0.1:{port}/db")
        assert result.code == 2 and len(result.err.splitlines()) == 1, (name, result.err)
        assert result.err.startswith("error: invalid login name") or "reserved by PostgreSQL" in result.err
    assert accepted == []  # refused before any connection
    members, settings = _members(granted), _settings(granted)
    other = granted.create_login("other")
    nologin = granted.create_login("group", login=False)
    cases = [
        (("--env", "dev", "--login", f"{granted.prefix}_nobody"),
         f"error: login '{granted.prefix}_nobody' does not exist; create it first (CREATE ROLE "
         f"{granted.prefix}_nobody LOGIN PASSWORD '...'), then run grant again"),
        (("--env", "dev", "--login", nologin),
         f"error: role '{nologin}' cannot log in (NOLOGIN); give the login the service connects with"),
        (("--env", "dev", "--login", granted.roles["prod"]),
         f"error: '{granted.roles['prod']}' is environment prod's group role, not a login; give the login "
         "the service connects with"),
        (("--env", "dev", "--login", "postgres"),
         "error: login 'postgres' is a superuser: no privilege binds it, so it cannot be isolated; give the "
         "service a login without SUPERUSER"),
        (("--env", "dev", "--login", other, "--store", "qdrant"),
         "error: grant knows --store postgres, redis, mongo, not 'qdrant'"),
        (("--env", "dev"), "error: grant --store postgres needs --login NAME, the login the service connects with"),
    ]
    for args, error in cases:
        result = project.cli("grant", *args)
        assert (result.code, result.err.splitlines()) == (2, [error])
    assert (_members(granted), _settings(granted)) == (members, settings)  # nothing written
    assert project.cli("grant", "--env", "prod", "--login", other).code == 0
    members, settings = _members(granted), _settings(granted)
    result = project.cli("grant", "--env", "dev", "--login", other, "--json")
    assert result.code == 2
    message = (f"login '{other}' already belongs to environment prod's role {granted.roles['prod']}; one login "
               f"serves one environment (revoke it there first: momentry-db grant --env prod --login {other} "
               "--revoke)")
    assert json.loads(result.out)["error"] == {"type": "RefusedError", "message": message, "exit_code": 2}
    assert (_members(granted), _settings(granted)) == (members, settings)
    assert (granted.roles["prod"], other) in members and _settings(granted) >= {(other, ("search_path=public",))}


def test_verify_names_each_privilege_that_undoes_isolation(granted: Granted) -> None:
    db, project, login, dev_role = granted.database, granted.project, granted.login, granted.roles["dev"]
    assert project.cli("grant", "--env", "dev", "--login", login).code == 0
    assert _verify(granted) == (0, {})
    assert _verify(granted, "prod") == (0, {})
    db.execute(f"GRANT SELECT ON public.videos TO {login}")
    code, failed = _verify(granted)
    assert code == 1 and failed == {
        f"{dev_role} and its members hold nothing on public's isolated tables": f"login {login}: SELECT on public.videos"}
    text = project.cli("verify", "--env", "dev", "--store", "postgres")
    assert text.code == 1 and (f"FAIL postgres {dev_role} and its members hold nothing on public's isolated tables: "
                               f"login {login}: SELECT on public.videos") in text.out.splitlines()
    db.execute(f"REVOKE SELECT ON public.videos FROM {login}; GRANT TRUNCATE, REFERENCES, TRIGGER ON public.chunks "
               f"TO {dev_role}; ALTER ROLE {login} SET search_path = public; REVOKE INSERT ON dev.videos FROM {dev_role}")
    code, failed = _verify(granted)
    assert code == 1 and failed == {
        f"{dev_role} and its members hold nothing on public's isolated tables": "; ".join(
            f"{who}: {p} on public.chunks" for who in (f"role {dev_role}", f"login {login}")
            for p in ("TRUNCATE", "REFERENCES", "TRIGGER")),
        f"{dev_role} and its members can use schema dev and the shared tables in public":
            f"role {dev_role}: missing INSERT on dev.videos; login {login}: missing INSERT on dev.videos",
        f"members of {dev_role} have search_path dev, public":
            f"login {login}: search_path is 'public', not 'dev, public'",
    }
    db.execute(f"GRANT {granted.roles['prod']} TO {login}")
    code, failed = _verify(granted)
    assert failed["no login belongs to two environments' roles"] == (
        f"login {login} belongs to {dev_role} (dev) and to prod ({granted.roles['prod']})")
    assert f"login {login}: SELECT on public.chunk_vectors" in failed[
        f"{dev_role} and its members hold nothing on public's isolated tables"].split("; ")
    db.execute(f"DROP OWNED BY {dev_role}")  # every grant the role held, gone
    code, failed = _verify(granted)
    assert failed[f"{dev_role} and its members can use schema dev and the shared tables in public"].startswith(
        f"role {dev_role}: missing USAGE on schema dev; role {dev_role}: missing SELECT on dev.chunk_vectors")


def test_grants_survive_reset_and_clone_and_revoke_undoes_them(granted: Granted) -> None:
    db, project, login, dev_role = granted.database, granted.project, granted.login, granted.roles["dev"]
    first = project.cli("grant", "--env", "dev", "--login", login, "--json")
    assert first.code == 0 and json.loads(first.out)["changed"] == [
        f"added to role {dev_role}", "search_path set to dev, public"]
    members, settings = _members(granted), _settings(granted)
    again = project.cli("grant", "--env", "dev", "--login", login)
    assert again.out.splitlines() == [f"postgres dev: login {login}: already in role {dev_role} with search_path "
                                      "dev, public; nothing changed"]
    assert (_members(granted), _settings(granted)) == (members, settings)

    reset = project.cli("reset", "--env", "dev", "--yes")
    assert reset.code == 0, reset.err
    with granted.connect() as conn:
        conn.execute("INSERT INTO videos (title, source_path) VALUES ('after reset', '/v/2')")
    assert db.query("SELECT title FROM dev.videos") == [("after reset",)]
    assert _verify(granted) == (0, {})

    db.execute("INSERT INTO public.videos (title, source_path) VALUES ('prod video', '/p/1')")
    assert project.cli("clone", "--from", "prod", "--to", "dev", "--store", "postgres").code == 0
    with granted.connect() as conn:
        assert conn.execute("SELECT title FROM videos").fetchall() == [("prod video",)]

    revoke = project.cli("grant", "--env", "dev", "--login", login, "--revoke", "--json")
    assert revoke.code == 0, revoke.err
    assert {k: v for k, v in json.loads(revoke.out).items() if k in ("revoke", "search_path", "changed")} == {
        "revoke": True, "search_path": None, "changed": [f"removed from role {dev_role}", "search_path reset"]}
    assert (dev_role, login) not in _members(granted) and login not in {s[0] for s in _settings(granted)}
    with granted.connect() as conn:
        assert conn.execute("SHOW search_path").fetchone() == ('"$user", public',)
        with pytest.raises(DENIED):
            conn.execute("SELECT * FROM dev.videos")
    twice = project.cli("grant", "--env", "dev", "--login", login, "--revoke")
    assert twice.out.splitlines() == [f"postgres dev: login {login}: not in role {dev_role}; nothing changed"]


def test_every_migrate_path_keeps_the_roles_current(granted: Granted, tmp_path) -> None:
    project, db = granted.project, granted.database
    roles = [granted.declare(env) for env in ("pr-1", "pr-2", "pr-3")]
    plant(project, tmp_path, 'op.create_table("extras", sa.Column("id", sa.Integer, primary_key=True))',
          doc="a table added later")
    # dev goes through Alembic alone; pr-1 and pr-2 stand at the same revision: one compiled script.
    result = project.cli("migrate", "--env", "dev", "--env", "pr-1", "--env", "pr-2", "--store", "postgres")
    assert result.code == 0, result.err
    # USAGE on two schemas; DML on 13 tables of its own (extras too) and 16 shared ones, USAGE and SELECT
    # on their identity sequences; SELECT on 4 shared views.
    everything = 2 + (13 + 16) * (4 + 2) + 4
    assert result.err.splitlines() == [
        f"postgres dev: role {granted.roles['dev']}: 6 privilege(s) granted",  # extras and its sequence
        f"postgres pr-1: role {roles[0]}: role created, {everything} privilege(s) granted",
        f"postgres pr-2: role {roles[1]}: role created, {everything} privilege(s) granted"]
    # plain alembic keeps them too
    alembic = project.alembic("-x", "schema=pr_3", "upgrade", "head")
    assert alembic.code == 0, alembic.err
    assert f"postgres pr-3: role {roles[2]}: role created, {everything} privilege(s) granted" in alembic.err.splitlines()
    for env in ("dev", "pr-1", "pr-3"):
        assert project.cli("grant", "--env", env, "--login", granted.create_login(env.replace("-", "_"))).code == 0
    for env in ("dev", "pr_1", "pr_3"):
        with granted.connect(f"{granted.prefix}_{env}") as conn:
            conn.execute("INSERT INTO extras (id) VALUES (1)")  # a table a later revision added
    assert [db.query(f"SELECT count(*) FROM {s}.extras")[0][0] for s in ("dev", "pr_1", "pr_2", "pr_3")] == [1, 1, 0, 1]
    code, failed = _verify(granted, "pr-1")
    assert code == 1 and set(failed) == {"pr_1 holds only isolated tables"}  # extras is in no model


def test_migrate_without_createrole_says_grants_were_not_managed(granted: Granted) -> None:
    db, project = granted.database, granted.project
    owner = granted.create_login("owner")
    role = granted.declare("pr-9")
    db.execute(f"GRANT CREATE ON DATABASE {db.name} TO {owner}")
    url = as_login(db.url, owner, granted.password)
    result = project.cli("migrate", "--env", "pr-9", "--store", "postgres", "--database-url", url)
    assert result.code == 0, result.err
    assert result.err.splitlines() == [
        f"postgres pr-9: grants not managed (role {role} does not exist and login {owner} lacks CREATEROLE; create "
        f"it (CREATE ROLE {role} NOLOGIN) or migrate with a login that may); momentry-db verify --env pr-9 names "
        "what is missing"]
    code, failed = _verify(granted, "pr-9")
    assert code == 1 and failed == {f"role {role} exists": f"role {role} does not exist, so grants were not "
                                    f"managed; run momentry-db migrate --env pr-9 with a login that has CREATEROLE"}
    refused = project.cli("grant", "--env", "pr-9", "--login", granted.login, "--database-url", url)
    assert (refused.code, refused.err.splitlines()) == (2, [
        f"error: login {owner} may not manage roles (it needs CREATEROLE or superuser); run grant with a login "
        "that may"])
    assert db.query("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)) == [(0,)]


def test_verify_names_a_function_that_runs_with_its_owners_rights(granted: Granted) -> None:
    db, dev_role = granted.database, granted.roles["dev"]
    assert granted.project.cli("grant", "--env", "dev", "--login", granted.login).code == 0
    db.execute("CREATE FUNCTION public.peek() RETURNS bigint LANGUAGE sql SECURITY DEFINER "
               "AS 'SELECT count(*) FROM public.videos'")
    with granted.connect() as conn:
        assert conn.execute("SELECT public.peek()").fetchone() == (0,)  # PUBLIC may execute it: prod's rows leak
    code, failed = _verify(granted)
    assert code == 1 and failed == {f"{dev_role} and its members hold nothing on public's isolated tables": (
        f"role {dev_role}: EXECUTE on function peek() (SECURITY DEFINER); "
        f"login {granted.login}: EXECUTE on function peek() (SECURITY DEFINER)")}
    db.execute("REVOKE EXECUTE ON FUNCTION public.peek() FROM PUBLIC")
    assert _verify(granted) == (0, {})


def _statements_of_a_no_op(granted: Granted, *envs: str) -> list[str]:
    """What a ``migrate --env ...`` run, in this process, sends; every target must be up to date."""
    import sqlalchemy as sa
    from sqlalchemy import event

    from momentry_db import command

    statements: list[str] = []

    def record(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    event.listen(sa.engine.Engine, "before_cursor_execute", record)
    try:
        result = command.migrate(load_project(granted.project.root, granted.project.environ), list(envs),
                                 stores=["postgres"])
    finally:
        event.remove(sa.engine.Engine, "before_cursor_execute", record)
    assert [(t["env"], t["outcome"]) for t in result.to_json()["targets"]] == [(e, "up to date") for e in envs]
    return statements


def _privilege_reads(granted: Granted, env: str) -> int:
    """How many statements a no-op ``migrate --env ENV`` sends that read privileges."""
    return sum("has_table_privilege" in s for s in _statements_of_a_no_op(granted, env))


def test_a_no_op_migrate_reads_no_privilege_once_the_roles_are_stamped(granted: Granted) -> None:
    project, db = granted.project, granted.database
    role = granted.roles["dev"]
    assert project.cli("migrate", "--env", "prod", "--env", "dev", "--store", "postgres").code == 0
    stamp = db.query(f"SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = '{role}'")
    assert stamp[0][0].startswith("momentry-db grants v2 ")
    statements = _statements_of_a_no_op(granted, "prod", "dev")
    assert [s for s in statements if "has_table_privilege" in s or "COMMENT ON ROLE" in s] == []
    # A table made by hand outside a migration moves the state: the next run grants it, and stamps again.
    db.execute("CREATE TABLE dev.by_hand (id int)")
    result = project.cli("migrate", "--env", "dev", "--store", "postgres")
    assert (result.code, result.err.splitlines()) == (0, [f"postgres dev: role {role}: 4 privilege(s) granted"])
    assert db.query(f"SELECT has_table_privilege('{role}', 'dev.by_hand', 'INSERT')") == [(True,)]
    assert db.query(f"SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = '{role}'") != stamp


def test_the_stamp_sees_a_privilege_changed_by_hand_where_the_role_depends_on_it(granted: Granted) -> None:
    """A role's stamp covers its own schema's ACLs whole and, in public, its own entries and PUBLIC's:
    a privilege revoked by hand in the schema is seen and granted again, while another role's entry
    changed in public's shared tables (which list every environment's role) leaves it unread."""
    db, project, role = granted.database, granted.project, granted.roles["dev"]
    other = granted.declare("pr-1")
    assert project.cli("migrate", "--env", "pr-1", "--store", "postgres").code == 0
    assert _privilege_reads(granted, "dev") == 0
    db.execute(f"REVOKE ALL ON public.api_keys FROM {other}")
    assert _privilege_reads(granted, "dev") == 0
    result = project.cli("migrate", "--env", "pr-1", "--store", "postgres")
    assert (result.code, result.err.splitlines()) == (0, [f"postgres pr-1: role {other}: 4 privilege(s) granted"])
    for revoke in (f"REVOKE INSERT ON dev.videos FROM {role}", f"REVOKE USAGE ON SEQUENCE dev.videos_id_seq FROM {role}",
                   f"REVOKE USAGE ON SCHEMA dev FROM {role}"):  # one at a time: each is seen on its own
        db.execute(revoke)
        result = project.cli("migrate", "--env", "dev", "--store", "postgres")
        assert (result.code, result.err.splitlines()) == (0, [f"postgres dev: role {role}: 1 privilege(s) granted"]), revoke
    assert db.query(f"SELECT has_table_privilege('{role}', 'dev.videos', 'INSERT'), "
                    f"has_sequence_privilege('{role}', 'dev.videos_id_seq', 'USAGE'), "
                    f"has_schema_privilege('{role}', 'dev', 'USAGE')") == [(True, True, True)]
    assert _privilege_reads(granted, "dev") == 0
    # A stamp of the earlier format is stale: the next run reads the privileges, writes none, stamps again.
    db.execute(f"COMMENT ON ROLE {role} IS 'momentry-db grants v1 {'0' * 64}'")
    before = _acls(granted)
    assert _privilege_reads(granted, "dev") > 0
    assert _acls(granted) == before
    stamp = db.query(f"SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = '{role}'")[0][0]
    assert stamp.startswith("momentry-db grants v2 ")
    assert _privilege_reads(granted, "dev") == 0


def test_one_environment_whose_grants_fail_does_not_stop_the_others_in_one_run(granted: Granted) -> None:
    """The roles of a run are made current in one transaction; when it fails, each environment is
    retried on its own, and only the one at fault reports it."""
    db, project = granted.database, granted.project
    owner = granted.create_login("owner")
    roles = {env: granted.declare(env) for env in ("pr-7", "pr-8", "pr-9")}
    db.execute(f"GRANT CREATE ON DATABASE {db.name} TO {owner}; "  # and may pass on public's shared tables
               f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {owner} WITH GRANT OPTION; "
               f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {owner} WITH GRANT OPTION; " + "".join(
        f"CREATE ROLE {role} NOLOGIN; " for env, role in roles.items() if env != "pr-9"))
    url = as_login(db.url, owner, granted.password)
    args = ["migrate", "--env", "pr-7", "--env", "pr-8", "--env", "pr-9", "--store", "postgres"]
    first = project.cli(*args, env={"DATABASE_URL": url})
    assert first.code == 0, first.err
    everything = 1 + (12 + 16) * (4 + 2) + 4  # USAGE on public comes with PUBLIC's; the rest as below
    assert first.err.splitlines() == [
        f"postgres pr-7: role {roles['pr-7']}: {everything} privilege(s) granted",
        f"postgres pr-8: role {roles['pr-8']}: {everything} privilege(s) granted",
        f"postgres pr-9: grants not managed (role {roles['pr-9']} does not exist and login {owner} lacks "
        f"CREATEROLE; create it (CREATE ROLE {roles['pr-9']} NOLOGIN) or migrate with a login that may); "
        "momentry-db verify --env pr-9 names what is missing"]
    # pr-7's role lost a privilege, and pr-8's schema gained a table its migrating login may not grant on.
    db.execute(f"REVOKE SELECT ON pr_7.videos FROM {roles['pr-7']}; CREATE TABLE pr_8.planted (id int)")
    before = db.query("SELECT count(*) FROM pg_class WHERE relnamespace = 'pr_8'::regnamespace")
    again = project.cli(*args, env={"DATABASE_URL": url})
    assert again.code == 0, again.err
    assert again.err.splitlines() == [
        f"postgres pr-7: role {roles['pr-7']}: 1 privilege(s) granted",
        "postgres pr-8: grants not managed (permission denied for table planted); momentry-db verify --env pr-8 "
        "names what is missing",
        f"postgres pr-9: grants not managed (role {roles['pr-9']} does not exist and login {owner} lacks "
        f"CREATEROLE; create it (CREATE ROLE {roles['pr-9']} NOLOGIN) or migrate with a login that may); "
        "momentry-db verify --env pr-9 names what is missing"]
    assert db.query(f"SELECT has_table_privilege('{roles['pr-7']}', 'pr_7.videos', 'SELECT'), "
                    f"has_table_privilege('{roles['pr-8']}', 'pr_8.planted', 'SELECT')") == [(True, False)]
    assert db.query("SELECT count(*) FROM pg_class WHERE relnamespace = 'pr_8'::regnamespace") == before
    db.execute("DROP TABLE pr_8.planted")


def test_the_plan_asks_about_a_relation_no_grant_touched_only_for_roles_that_may_hold_it(granted: Granted) -> None:
    """A relation whose ACL is still the default (a table just created) is held by its owner, the
    owner's members, superusers and, for reading, pg_read_all_data's members alone. The plan skips the
    question for every other role; its answers must still be has_*_privilege's, role by role."""
    from momentry_db.stores.postgres import grants
    from momentry_db.stores.postgres.connection import create_engine

    db = granted.database
    owner, plain, member, reader = (granted.create_login(n, login=False) for n in ("owns", "plain", "member", "reader"))
    schema = f"{granted.prefix}_fresh"
    db.execute(f"CREATE SCHEMA {schema} AUTHORIZATION {owner}; SET ROLE {owner}; "
               f"CREATE TABLE {schema}.fresh (id int GENERATED BY DEFAULT AS IDENTITY); "
               f"CREATE TABLE {schema}.granted (id int); GRANT INSERT ON {schema}.granted TO {plain}; RESET ROLE; "
               f"GRANT {owner} TO {member}; GRANT pg_read_all_data TO {reader}")
    engine = create_engine(db.sa_url)
    with engine.connect() as conn:
        relations = grants._relations(conn, {schema})
        assert [(r.name, r.kind, r.owner_only is not None) for r in relations] == [
            ("fresh", "r", True), ("fresh_id_seq", "S", True), ("granted", "r", False)]
        asked = [grants.Privilege("table" if r.kind == "r" else "sequence", schema, r.name, p, oid=r.oid,
                                  owner_only=r.owner_only)
                 for r in relations for p in (("SELECT", "INSERT") if r.kind == "r" else ("USAGE", "SELECT"))]
        held = grants._held_plan(conn, [(role, asked, []) for role in (plain, member, reader)])
    engine.dispose()
    truth = {(role, p): db.query(f"SELECT has_{p.kind}_privilege(%s, %s::regclass::oid, %s)",
                                 (role, f"{schema}.{p.name}", p.privilege))[0][0]
             for role in (plain, member, reader) for p in asked}
    answers = {key: held[key] for key in truth}
    assert answers == truth
    short = {(role, p.name, p.privilege) for (role, p), yes in answers.items() if yes}
    assert short == {(plain, "granted", "INSERT"),
                     *((member, n, p) for n in ("fresh", "granted") for p in ("SELECT", "INSERT")),
                     (member, "fresh_id_seq", "USAGE"), (member, "fresh_id_seq", "SELECT"),
                     (reader, "fresh", "SELECT"), (reader, "granted", "SELECT"), (reader, "fresh_id_seq", "SELECT")}


def test_roles_that_hold_nothing_here_are_asked_about_once_and_answered_as_has_privilege_would(
        granted: Granted, monkeypatch) -> None:
    """Existing roles that hold nothing of their own in the database (a new database on a cluster that
    kept its roles) hold exactly what PUBLIC holds: the plan asks each question once, for one of
    them. A role named in an ACL, one that owns an object, a member of another role and a superuser
    are each asked about on their own, as is the database's owner (through pg_database_owner it may
    create in public), and every answer is has_*_privilege's."""
    from momentry_db.stores.postgres import grants
    from momentry_db.stores.postgres.connection import create_engine

    db = granted.database
    blank = [granted.create_login(f"blank{i}", login=False) for i in range(3)]
    named, owner, member, group = (granted.create_login(n, login=False) for n in ("named", "owner", "member", "group"))
    superuser, dbowner = (granted.create_login(n, login=False) for n in ("super", "dbowner"))
    schema = f"{granted.prefix}_bare"
    database, was = db.query("SELECT current_database(), pg_get_userbyid(datdba) FROM pg_database "
                             "WHERE datname = current_database()")[0]
    db.execute(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.open (id int); CREATE TABLE {schema}.shut (id int); "
               f"CREATE TABLE {schema}.named (id int); CREATE TABLE {schema}.grouped (id int); "
               f"GRANT SELECT ON {schema}.open TO PUBLIC; GRANT USAGE ON SCHEMA {schema} TO PUBLIC; "
               f"GRANT INSERT ON {schema}.named TO {named}; GRANT DELETE ON {schema}.grouped TO {group}; "
               f"GRANT {group} TO {member}; CREATE TABLE {schema}.owned (id int); "
               f"ALTER TABLE {schema}.owned OWNER TO {owner}; ALTER ROLE {superuser} SUPERUSER")
    tables = ("open", "shut", "named", "grouped", "owned")
    want = [grants.Privilege("schema", schema, "", "USAGE"), grants.Privilege("schema", "public", "", "CREATE")] + [
        grants.Privilege("table", schema, t, p) for t in tables for p in ("SELECT", "INSERT")]
    deny = [grants.Privilege("table", schema, t, p) for t in tables for p in ("SELECT", "DELETE")]
    roles = [*blank, named, owner, member, superuser, dbowner]
    asked: list[int] = []
    real = grants._unexpected
    monkeypatch.setattr(grants, "_unexpected", lambda conn, asks: asked.append(len(asks)) or real(conn, asks))
    db.execute(f'ALTER DATABASE "{database}" OWNER TO {dbowner}')
    try:
        engine = create_engine(db.sa_url)
        with engine.connect() as conn:
            held = grants._held_plan(conn, [(role, want, deny) for role in roles])
            conn.rollback()
        engine.dispose()
        truth = {(role, p): db.query(f"SELECT has_{p.kind}_privilege(%s, %s, %s)", (
            role, p.schema if p.kind == "schema" else f"{schema}.{p.name}", p.privilege))[0][0]
            for role in roles for p in [*want, *deny]}
    finally:
        db.execute(f'ALTER DATABASE "{database}" OWNER TO "{was}"')
    per_role = len(want) + len(tables)  # a forbidden object's privileges are one question
    assert asked == [per_role * (1 + len(roles) - len(blank))]
    answers = {(role, p): held[(role, p)] for role in roles for p in want}
    answers.update({(role, p): held.forbidden(role, p) for role in roles for p in deny})
    assert answers == truth
    assert {(r, p.name, p.privilege) for (r, p), yes in truth.items() if yes and r in blank and p.kind == "table"} == {
        (r, "open", "SELECT") for r in blank}
    assert truth[named, grants.Privilege("table", schema, "named", "INSERT")]
    assert truth[member, grants.Privilege("table", schema, "grouped", "DELETE")]
    assert truth[owner, grants.Privilege("table", schema, "owned", "INSERT")]
    assert truth[superuser, grants.Privilege("table", schema, "shut", "INSERT")]
    create = grants.Privilege("schema", "public", "", "CREATE")
    assert [truth[role, create] for role in roles] == [False] * (len(roles) - 2) + [True, True]


# --- grants made while a fan-out runs ------------------------------------------------------------

_EVERY_NEW_ROLE = 2 + (12 + 16) * (4 + 2) + 4  # as in the tests above: USAGE, DML, sequences, shared views


def _held_by_role(db, role: str, schema: str) -> set[tuple[str, str, str]]:
    """Every privilege ``role`` holds on public's and ``schema``'s relations, from the catalogs, with
    ``schema`` written as "own" so two environments' sets compare."""
    rows = db.query(
        "SELECT n.nspname, c.relname, p FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, "
        "unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER', 'USAGE']) p "
        "WHERE n.nspname IN ('public', %s) AND CASE WHEN c.relkind = 'S' THEN p IN ('SELECT', 'UPDATE', 'USAGE') "
        "AND has_sequence_privilege(%s, c.oid, p) ELSE c.relkind IN ('r', 'p', 'v', 'm') AND p <> 'USAGE' "
        "AND has_table_privilege(%s, c.oid, p) END", (schema, role, role))
    return {("own" if s == schema else s, rel, p) for s, rel, p in rows}


def _streamed_in_batches_of_two(monkeypatch, last_schema: str, first_batch) -> None:
    """Grants made beside the lanes in batches of two; the lane holds ``last_schema`` until
    ``first_batch`` (a threading.Event) is set."""
    from momentry_db.stores.postgres import fanout, grants

    real_run = fanout._run_compiled

    def lane_waits_for_a_batch(conn, target, *args, **kwargs):
        if target.schema == last_schema:
            assert first_batch.wait(60)
        return real_run(conn, target, *args, **kwargs)

    monkeypatch.setattr(fanout, "_run_compiled", lane_waits_for_a_batch)
    monkeypatch.setattr(grants.Alongside, "SMALLEST_BATCH", 2)


@pytest.mark.parametrize("batch_fails", [False, True], ids=["batches", "a-failed-batch-left-to-the-end"])
def test_grants_made_while_the_schemas_run_equal_grants_made_at_the_end(granted: Granted, monkeypatch,
                                                                        batch_fails: bool) -> None:
    """Over enough schemas, a thread of its own grants the committed ones in batches while the lanes go on;
    the end of the run grants what is left. The roles end with exactly what one grant step at the end
    gives them, each environment is granted once and reported once, in order, and a batch that fails
    as a whole is left to the end."""
    import threading

    from momentry_db.stores.postgres import grants

    db, project = granted.database, granted.project
    streamed_envs = [f"pr-{i}" for i in range(1, 7)]
    at_end_envs = [f"pr-{i}" for i in range(11, 17)]
    roles = {env: granted.declare(env) for env in streamed_envs + at_end_envs}
    calls: list[tuple[str, list[str]]] = []  # (thread, schemas) of every grant batch
    first_batch = threading.Event()
    real_group = grants._ensure_group

    def spy_group(conn, group, *args, **kwargs):
        thread = threading.current_thread().name
        if batch_fails and thread == "momentry-db grants":
            calls.append((thread + " (failed)", [t.schema for t in group]))
            first_batch.set()
            raise RuntimeError("the server went away")
        out = real_group(conn, group, *args, **kwargs)
        calls.append((thread, [t.schema for t in group]))
        if thread == "momentry-db grants":
            first_batch.set()
        return out

    monkeypatch.setattr(grants, "_ensure_group", spy_group)
    _streamed_in_batches_of_two(monkeypatch, "pr_6", first_batch)  # the last schema waits for a batch
    args = [a for env in streamed_envs for a in ("--env", env)]
    streamed = project.cli("migrate", *args, "--store", "postgres")
    assert streamed.code == 0, streamed.err
    assert streamed.err.splitlines() == [f"postgres {env}: role {roles[env]}: role created, "
                                         f"{_EVERY_NEW_ROLE} privilege(s) granted" for env in streamed_envs]
    beside = [schemas for thread, schemas in calls if thread.startswith("momentry-db grants")]
    assert beside[0] == ["pr_1", "pr_2"]
    granted_once = [s for thread, schemas in calls if not thread.endswith("(failed)") for s in schemas]
    assert sorted(granted_once) == [env.replace("-", "_") for env in streamed_envs]  # each once
    if batch_fails:
        assert calls[-1] == ("MainThread", [env.replace("-", "_") for env in streamed_envs])
    else:  # the end of the run grants what no full batch took: at most one batch, or nothing at all
        at_the_end = [schemas for thread, schemas in calls if thread == "MainThread"]
        assert at_the_end == [] or (len(at_the_end) == 1 and len(at_the_end[0]) <= 2
                                    and calls[-1][0] == "MainThread")

    calls.clear()
    monkeypatch.setattr(grants.Alongside, "SMALLEST_BATCH", 10**6)  # one grant step at the end
    at_end = project.cli("migrate", *[a for env in at_end_envs for a in ("--env", env)], "--store", "postgres")
    assert at_end.code == 0, at_end.err
    assert calls == [("MainThread", [env.replace("-", "_") for env in at_end_envs])]
    expected = _held_by_role(db, roles["pr-11"], "pr_11")
    assert len(expected) == _EVERY_NEW_ROLE - 2  # every privilege but the two USAGE on schemas
    assert not {p for p in expected if p[0] == "public" and p[1] == "videos"}  # an isolated table of prod
    for env in streamed_envs + at_end_envs:
        assert _held_by_role(db, roles[env], env.replace("-", "_")) == expected, env
    again = project.cli("migrate", *args, "--store", "postgres")  # every batch stamped its roles
    assert (again.code, again.err) == (0, "")
    code, failed = _verify(granted, "pr-3")
    assert (code, failed) == (0, {})


def test_a_batch_whose_connection_dies_after_its_commit_still_reports_what_it_granted(granted: Granted,
                                                                                    monkeypatch) -> None:
    """The server drops the grants thread's connection after a batch committed and before its roles
    were stamped: what the batch granted is still reported, once per environment and in order; the
    roles left unstamped are read again by the next run, which finds nothing to grant."""
    import threading

    from momentry_db.stores.postgres import grants

    db, project = granted.database, granted.project
    envs = [f"pr-{i}" for i in range(21, 27)]
    roles = {env: granted.declare(env) for env in envs}
    killed: list[list[str]] = []
    first_batch = threading.Event()
    real_stamp = grants._stamp

    def stamp_on_a_dead_connection(conn, ensured):
        if threading.current_thread().name == "momentry-db grants" and not killed:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            db.execute(f"SELECT pg_terminate_backend({pid}, 5000)")
            killed.append([env.schema for env, _ in ensured])
            first_batch.set()
        return real_stamp(conn, ensured)

    monkeypatch.setattr(grants, "_stamp", stamp_on_a_dead_connection)
    _streamed_in_batches_of_two(monkeypatch, "pr_26", first_batch)
    args = [a for env in envs for a in ("--env", env)]
    run = project.cli("migrate", *args, "--store", "postgres")
    assert run.code == 0, run.err
    assert killed and killed[0] == ["pr_21", "pr_22"]
    assert run.err.splitlines() == [f"postgres {env}: role {roles[env]}: role created, "
                                    f"{_EVERY_NEW_ROLE} privilege(s) granted" for env in envs]
    unstamped = db.query("SELECT r.rolname FROM pg_roles r WHERE r.rolname = ANY(%s) "
                         "AND shobj_description(r.oid, 'pg_authid') IS NULL ORDER BY 1",
                         ([roles["pr-21"], roles["pr-22"]],))
    assert unstamped == [(roles["pr-21"],), (roles["pr-22"],)]
    again = project.cli("migrate", *args, "--store", "postgres")
    assert (again.code, again.err) == (0, "")
    code, failed = _verify(granted, "pr-21")
    assert (code, failed) == (0, {})


def test_plain_alembic_over_enough_schemas_grants_each_role_once_and_in_order(granted: Granted) -> None:
    """``alembic upgrade head`` over 32 new environments takes the compiled path, whose grants are made
    while the schemas run (``grants.Alongside``): every role gets all it needs, once, reported in order."""
    db, project = granted.database, granted.project
    envs = [f"e{i:02d}" for i in range(1, 33)]
    roles = {env: granted.declare(env) for env in envs}
    result = project.alembic("upgrade", "head")
    assert result.code == 0, result.err
    notices = [line for line in result.err.splitlines() if line.startswith("postgres ")]
    assert notices == [f"postgres {env}: role {roles[env]}: role created, {_EVERY_NEW_ROLE} privilege(s) granted"
                       for env in envs]
    expected = _held_by_role(db, roles["e01"], "e01")
    assert len(expected) == _EVERY_NEW_ROLE - 2
    assert all(_held_by_role(db, roles[env], env) == expected for env in envs)
    again = project.cli("migrate", "--all", "--store", "postgres")
    assert again.code == 0 and again.err == "", again.err


def test_a_warm_parallel_run_grants_every_new_role_without_importing_the_models(granted: Granted) -> None:
    """The grants of a compiled run (beside the lanes, then at the end) read the models' names from
    the state directory's record: a run that finds its scripts kept imports neither the models nor
    Alembic, in any thread, and its roles get exactly what a run that imported them gets."""
    db, project = granted.database, granted.project
    first, second = [f"e{i:02d}" for i in range(1, 33)], [f"f{i:02d}" for i in range(1, 33)]
    roles = {env: granted.declare(env) for env in first}
    args = ("migrate", "--all", "--store", "postgres", "--parallel", "2")
    cold_modules, cold = project.imports(*args)
    assert cold.code == 0, cold.err
    assert {"momentry_db.models", "momentry_db.tables", "alembic"} <= cold_modules
    kept = json.loads((Path(project.environ["MOMENTRY_STATE_DIR"]) / "postgres-scripts.json").read_text())
    assert kept["scopes"]["shared"] == sorted(shared_tables())
    assert kept["scopes"]["isolated"] == sorted(isolated_tables())
    assert kept["scopes"]["views"] == sorted(view_names())
    roles.update({env: granted.declare(env) for env in second})
    warm_modules, warm = project.imports(*args)
    assert warm.code == 0, warm.err
    assert not {m for m in warm_modules if m.startswith(("alembic", "momentry_db.models", "momentry_db.tables"))}
    assert warm.err.splitlines() == [f"postgres {env}: role {roles[env]}: role created, "
                                     f"{_EVERY_NEW_ROLE} privilege(s) granted" for env in second]
    expected = _held_by_role(db, roles["e01"], "e01")
    assert len(expected) == _EVERY_NEW_ROLE - 2
    assert all(_held_by_role(db, roles[env], env) == expected for env in first + second)
    code, failed = _verify(granted, "f32")
    assert (code, failed) == (0, {})


def test_batches_beside_the_lanes_shrink_towards_the_end(monkeypatch) -> None:
    """Batches are an eighth of the run until half of what is left is less, then half of it, never below
    the smallest batch: the run's last step waits for a few environments, not a full batch."""
    from types import SimpleNamespace

    from momentry_db.stores.postgres import grants
    from tests.helpers import wait_until

    sizes: list[int] = []
    monkeypatch.setattr(grants, "connect", lambda target: SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(grants, "_ensure_group", lambda conn, group, *args: sizes.append(len(group)) or [])
    monkeypatch.setattr(grants.Alongside, "SMALLEST_BATCH", 4)
    targets = [SimpleNamespace(schema=f"s{i:03d}", env=SimpleNamespace(name=f"s{i:03d}", pg_grants=True),
                               url=lambda: "postgresql://db") for i in range(100)]
    along = grants.Alongside.for_run(targets, lambda: grants.Scopes(frozenset(), frozenset(), frozenset(), frozenset()))
    assert along is not None and along.batch == 12
    for target in targets:
        along.committed(target)
    wait_until(lambda: sum(sizes) == 100, "every target taken by a batch", within=10)
    along.finish()
    assert sizes == [12] * 7 + [8, 4, 4]

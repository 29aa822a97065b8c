"""Privileges in Redis, MongoDB and Qdrant: dev's credentials cannot reach prod's data.

Redis runs on the machine's Redis 7 (tests marked redis): each test makes ACL users of its own and
deletes them. MongoDB runs on SecantusDB with ``--auth`` (roles enforced), over the wire. Qdrant
tokens are checked by decoding them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from momentry_db.environments import Environment
from momentry_db.errors import ConfigError, RefusedError
from momentry_db.settings import Project as Settings
from momentry_db.settings import load_project
from momentry_db.verify import FAIL, NOT_CHECKABLE, PASS, Check, VerifyResult

from .helpers import NO_EMBEDDED, REPO, Project, document, secantus_with_auth

KEY = "k" * 16 + uuid.uuid4().hex  # 48 bytes: PyJWT warns below 32 for HS256


def settings(root: Path, environ: dict[str, str], files: dict[str, str] | None = None) -> Settings:
    root.mkdir(exist_ok=True)
    for name, text in (files or {}).items():
        (root / name).write_text(text)
    return load_project(root, {**NO_EMBEDDED, "MOMENTRY_STATE_DIR": str(root / ".state"), **environ})


def checks(result: VerifyResult, store: str) -> list[Check]:
    return [c for c in result.checks if c.store == store and c.name.startswith("login")]


# --- Redis ---------------------------------------------------------------------------------------


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def redis_admin(redis_url: str, tag: str) -> Iterator[object]:
    """An admin client on the machine's Redis; every ACL user named after this test's tag is deleted after."""
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    for user in client.acl_users():
        if tag in (user.decode() if isinstance(user, bytes) else user):
            client.acl_deluser(user)
    keys = list(client.scan_iter(match=f"t{tag}*"))
    if keys:
        client.delete(*keys)
    client.close()


def redis_project(tmp_path: Path, redis_url: str, tag: str, user: str | None, password: str = "pw-S3cret-1") -> Settings:
    """dev and prod with prefixes of this test's own; dev's REDIS_URL logs in as ``user``."""
    base = redis_url.split("://", 1)[1]
    dev_url = f"redis://{user}:{password}@{base}" if user else redis_url
    return settings(tmp_path / "p", {}, {".env": f"MOMENTRY_REDIS_PREFIX=t{tag}:\nREDIS_URL={redis_url}\n",
                                         ".env.development": f"MOMENTRY_REDIS_PREFIX=t{tag}_dev:\nREDIS_URL={dev_url}\n"})


def envs(project: Settings) -> tuple[Environment, Environment]:
    return project.environment("dev"), project.environment("prod")


@pytest.mark.redis
def test_grant_limits_the_redis_user_to_its_prefix(tmp_path, redis_url, redis_admin, tag) -> None:
    import redis

    from momentry_db.stores import redis_acl

    user = f"dev_{tag}"
    dev, prod = envs(redis_project(tmp_path, redis_url, tag, user))
    assert redis_admin.acl_getuser(user) is None
    lines = redis_acl.grant(dev, redis_url)
    assert lines == [
        f"redis dev: created user {user}: keys t{tag}_dev:*, channels t{tag}_dev:*, commands "
        "+@all -@dangerous -function -script|flush -script|kill",
        "redis dev: the server has no ACL file, so this lasts until it restarts; set aclfile in redis.conf "
        "(then ACL SAVE) or CONFIG REWRITE to keep it"]
    assert "pw-S3cret-1" not in "".join(lines)
    acl = redis_admin.acl_getuser(user)
    assert (acl["keys"], acl["channels"], acl["enabled"]) == ([f"~t{tag}_dev:*"], [f"&t{tag}_dev:*"], True)
    assert acl["categories"][:2] == ["+@all", "-@dangerous"]

    as_dev = redis.Redis.from_url(dev.redis_url.reveal())
    try:
        assert as_dev.set(f"t{tag}_dev:job", "1") and as_dev.get(f"t{tag}_dev:job") == b"1"
        assert as_dev.publish(f"t{tag}_dev:events", "x") == 0
        redis_admin.set(f"t{tag}:job", "prod's")
        refused = [lambda: as_dev.get(f"t{tag}:job"), lambda: as_dev.set(f"t{tag}:job", "dev's"),
                   lambda: as_dev.delete(f"t{tag}:job"), lambda: as_dev.publish(f"t{tag}:events", "x"),
                   lambda: as_dev.config_get("maxmemory"), lambda: as_dev.execute_command("ACL", "LIST")]
        for attempt in refused:
            with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions"):
                attempt()
        assert redis_admin.get(f"t{tag}:job") == b"prod's"  # untouched
    finally:
        as_dev.close()
    # The server is shared: what would be destructive if allowed is asked of ACL DRYRUN, never run.
    for command in (["FLUSHALL"], ["FLUSHDB"], ["KEYS", "*"], ["SHUTDOWN"], ["DEBUG", "SLEEP", "0"],
                    ["CONFIG", "SET", "maxmemory", "1"], ["MODULE", "LIST"], ["SWAPDB", "0", "1"],
                    ["FUNCTION", "FLUSH"], ["SCRIPT", "FLUSH"], ["SCRIPT", "KILL"], ["MONITOR"],
                    ["CLIENT", "KILL", "ID", "1"], ["ACL", "SETUSER", user, "~*"]):
        answer = redis_admin.execute_command("ACL", "DRYRUN", user, *command).decode()
        assert answer.startswith(f"This user has no permissions to run the '{command[0].lower()}"), (command, answer)
    for command in (["SET", f"t{tag}_dev:x", "1"], ["EVAL", "return 1", "0"], ["SCAN", "0"], ["SELECT", "1"]):
        assert redis_admin.execute_command("ACL", "DRYRUN", user, *command) == b"OK", command

    revoked = redis_acl.grant(dev, redis_url, revoke=True)
    assert revoked[0] == f"redis dev: deleted user {user}"
    assert redis_admin.acl_getuser(user) is None
    assert redis_acl.grant(dev, redis_url, revoke=True) == [f"redis dev: user {user} does not exist; nothing to revoke"]


@pytest.mark.redis
def test_a_second_grant_resets_what_was_added_by_hand_and_the_password(tmp_path, redis_url, redis_admin, tag) -> None:
    import redis

    from momentry_db.stores import redis_acl

    user = f"dev_{tag}"
    dev, _ = envs(redis_project(tmp_path, redis_url, tag, user, password="first-pass"))
    redis_acl.grant(dev, redis_url)
    redis_admin.execute_command("ACL", "SETUSER", user, "+keys", "+flushdb", ">extra-pass")
    assert redis_admin.execute_command("ACL", "DRYRUN", user, "KEYS", "*") == b"OK"
    dev2, _ = envs(redis_project(tmp_path, redis_url, tag, user, password="second-pass"))
    assert redis_acl.grant(dev2, redis_url)[0].startswith(f"redis dev: updated user {user}: ")
    for command in ("KEYS", "FLUSHDB"):
        assert redis_admin.execute_command("ACL", "DRYRUN", user, command, *(["*"] if command == "KEYS" else [])) \
            == f"This user has no permissions to run the '{command.lower()}' command".encode()
    assert len(redis_admin.acl_getuser(user)["passwords"]) == 1
    for password, works in (("first-pass", False), ("extra-pass", False), ("second-pass", True)):
        client = redis.Redis.from_url(f"redis://{user}:{password}@{redis_url.split('://', 1)[1]}")
        try:
            if works:
                assert client.ping()
            else:
                with pytest.raises(redis.AuthenticationError):
                    client.ping()
        finally:
            client.close()


@pytest.mark.redis
def test_grant_never_takes_over_another_environments_user(tmp_path, redis_url, redis_admin, tag) -> None:
    from momentry_db.stores import redis_acl

    user = f"prod_{tag}"
    redis_admin.execute_command("ACL", "SETUSER", user, "on", ">prod-pass", f"~t{tag}:*", "+@all")
    before = redis_admin.acl_getuser(user)
    dev, _ = envs(redis_project(tmp_path, redis_url, tag, user))
    for revoke in (False, True):
        with pytest.raises(RefusedError, match=rf"redis user '{user}' already has keys ~t{tag}:\*, not dev's "
                                                rf"t{tag}_dev:\* alone; it may be another environment's"):
            redis_acl.grant(dev, redis_url, revoke=revoke)
    assert redis_admin.acl_getuser(user) == before


@pytest.mark.parametrize("url, message", [
    (None, "REDIS_URL is not set for dev"),
    ("redis://127.0.0.1:6379/15", "dev's REDIS_URL logs in as the default user; name a user of its own"),
    ("redis://default:pw@127.0.0.1:6379/15", "dev's REDIS_URL logs in as the default user"),
    ("redis://someone@127.0.0.1:6379/15", "dev's REDIS_URL has no password for user 'someone'"),
])
def test_grant_needs_a_named_user_with_a_password_before_connecting(tmp_path, silent_server, url, message) -> None:
    from momentry_db.stores import redis_acl

    project = settings(tmp_path / "p", {"REDIS_URL": url} if url else {})
    admin = f"redis://127.0.0.1:{silent_server[0]}/0"  # never contacted
    with pytest.raises(ConfigError, match=message):
        redis_acl.grant(project.environment("dev"), admin)
    assert silent_server[1] == []


def test_the_admin_url_comes_from_the_option_else_its_variable(tmp_path) -> None:
    project = settings(tmp_path / "p", {})
    with pytest.raises(ConfigError, match="grant --store redis needs an administrative URL: pass --admin-url URL "
                                          "or set MOMENTRY_REDIS_ADMIN_URL"):
        project.admin_url("redis")
    with pytest.raises(ConfigError, match="set MOMENTRY_MONGO_ADMIN_URL"):
        project.admin_url("mongo")
    project = settings(tmp_path / "p", {"MOMENTRY_REDIS_ADMIN_URL": "redis://admin:adm1n-pw@h:1/0"})
    assert project.admin_url("redis") == "redis://admin:adm1n-pw@h:1/0"
    assert project.admin_url("redis", "redis://other@h:2/0") == "redis://other@h:2/0"
    assert "adm1n-pw" in project.secrets()  # masked in every output like any connection secret


@pytest.mark.redis
def test_verify_proves_the_redis_user_is_limited_to_its_prefix(tmp_path, redis_url, redis_admin, tag) -> None:
    from momentry_db.stores import redis_acl

    user = f"dev_{tag}"
    dev, prod = envs(redis_project(tmp_path, redis_url, tag, user))
    name = f"login {user} is limited to t{tag}_dev:*"

    result = VerifyResult("verify", "dev")
    redis_acl.check(result, dev, [prod])  # no such user yet
    assert [(c.status, c.name) for c in checks(result, "redis")] == [(FAIL, name)]
    assert checks(result, "redis")[0].detail.startswith(f"cannot log in as {user}: ")
    assert checks(result, "redis")[0].detail.endswith("run momentry-db grant --env dev --store redis")

    redis_acl.grant(dev, redis_url)
    result = VerifyResult("verify", "dev")
    redis_acl.check(result, dev, [prod])
    assert checks(result, "redis") == [Check("redis", name, PASS, f"own prefix read and written; refused: prod t{tag}:*, CONFIG")]

    redis_admin.execute_command("ACL", "SETUSER", user, "~*", "+config|get")  # widened by hand
    result = VerifyResult("verify", "dev")
    redis_acl.check(result, dev, [prod])
    assert checks(result, "redis") == [Check("redis", name, FAIL, "; ".join([
        f"{user} may read prod's keys t{tag}:* (no NOPERM)", f"{user} may write prod's keys t{tag}:* (no NOPERM)",
        f"{user} may run CONFIG (a dangerous command)"]))]
    assert list(redis_admin.scan_iter(match=f"t{tag}*")) == []  # the probes left nothing behind


@pytest.mark.redis
def test_verify_through_the_cli_passes_once_granted(tmp_path, redis_url, redis_admin, tag) -> None:
    from momentry_db.stores import redis_acl

    user = f"dev_{tag}"
    dev, _ = envs(redis_project(tmp_path, redis_url, tag, user))  # env files in tmp_path / "p"
    redis_acl.grant(dev, redis_url)
    project = Project(tmp_path / "p", {**NO_EMBEDDED, "MOMENTRY_STATE_DIR": str(tmp_path / "state")})
    result = project.cli("verify", "--env", "dev", "--store", "redis")
    assert result.code == 0, result.out + result.err
    assert f"ok   redis    login {user} is limited to t{tag}_dev:*: own prefix read and written; refused: " \
           f"prod t{tag}:*, CONFIG" in result.out.splitlines()
    assert "pw-S3cret-1" not in result.out + result.err


def test_verify_says_a_default_redis_login_is_not_checkable(tmp_path) -> None:
    from momentry_db.stores import redis_acl

    project = settings(tmp_path / "p", {"REDIS_URL": "redis://:some-pass@127.0.0.1:1/0"})
    result = VerifyResult("verify", "dev")
    redis_acl.check(result, project.environment("dev"), [project.environment("prod")])
    assert result.checks == [Check(
        "redis", "login default is limited to momentry_dev:*", NOT_CHECKABLE,
        "REDIS_URL logs in as the default user, which no ACL limits; name a user of dev's own in REDIS_URL, "
        "then run momentry-db grant --env dev --store redis")]


# --- MongoDB ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_mongo(tmp_path_factory) -> Iterator[str]:
    """SecantusDB with --auth: the administrator's URL."""
    with secantus_with_auth(tmp_path_factory.mktemp("secantus-auth") / "data", "root", "r00t-pass") as url:
        yield url


def mongo_env(tmp_path: Path, admin_url: str, user: str | None, password: str = "dev-Pa55", db: str = "momentry_dev",
              prod_db: str = "momentry") -> tuple[Environment, Environment]:
    hostpart = admin_url.split("@", 1)[1]
    dev_url = f"mongodb://{user}:{password}@{hostpart}" if user else f"mongodb://{hostpart}"
    project = settings(tmp_path / "m", {}, {".env": f"MONGODB_DATABASE={prod_db}\nMONGODB_URL=mongodb://{hostpart}\n",
                                            ".env.development": f"MONGODB_DATABASE={db}\nMONGODB_URL={dev_url}\n"})
    return project.environment("dev"), project.environment("prod")


def roles(admin_url: str, user: str) -> list[dict] | None:
    from pymongo import MongoClient

    client = MongoClient(admin_url)
    try:
        users = client.admin.command("usersInfo", {"user": user, "db": "admin"})["users"]
        return users[0]["roles"] if users else None
    finally:
        client.close()


def test_grant_gives_the_mongo_user_readwrite_on_its_database_only(tmp_path, auth_mongo) -> None:
    from pymongo import MongoClient
    from pymongo.errors import OperationFailure

    from momentry_db.stores import mongo_users

    user = f"dev_{uuid.uuid4().hex[:8]}"
    dev, prod = mongo_env(tmp_path, auth_mongo, user)
    admin = MongoClient(auth_mongo)
    admin.momentry.videos.insert_one({"title": "prod's"})
    assert roles(auth_mongo, user) is None
    assert mongo_users.grant(dev, auth_mongo) == [
        f"mongo dev: user {user} (in admin): created with readWrite on momentry_dev only"]
    assert roles(auth_mongo, user) == [{"role": "readWrite", "db": "momentry_dev"}]

    as_dev = MongoClient(dev.mongodb_url.reveal())
    try:
        as_dev.momentry_dev.videos.insert_one({"title": "dev's"})
        assert as_dev.momentry_dev.videos.count_documents({}) == 1
        for attempt in (lambda: as_dev.momentry.videos.find_one(), lambda: as_dev.momentry.videos.insert_one({}),
                        lambda: as_dev.momentry.videos.drop(), lambda: as_dev.drop_database("momentry")):
            with pytest.raises(OperationFailure, match="not authorized on momentry") as caught:
                attempt()
            assert caught.value.code == 13
        assert [d["title"] for d in admin.momentry.videos.find()] == ["prod's"]
    finally:
        as_dev.close()

    result = VerifyResult("verify", "dev")
    mongo_users.check(result, dev, [prod])
    assert checks(result, "mongo") == [Check("mongo", f"login {user} is limited to momentry_dev", PASS,
                                             "own database read; Unauthorized on prod's momentry")]

    assert mongo_users.grant(dev, auth_mongo, revoke=True) == [f"mongo dev: user {user} (in admin): dropped"]
    assert roles(auth_mongo, user) is None
    assert mongo_users.grant(dev, auth_mongo, revoke=True) == [
        f"mongo dev: user {user} (in admin) does not exist; nothing to revoke"]
    result = VerifyResult("verify", "dev")
    mongo_users.check(result, dev, [prod])
    (check,) = checks(result, "mongo")
    assert check.status == FAIL and check.detail.startswith(f"cannot log in as {user} or read as it: ")
    admin.drop_database("momentry")
    admin.drop_database("momentry_dev")
    admin.close()


def test_a_second_mongo_grant_updates_the_password_and_narrows_the_roles(tmp_path, auth_mongo) -> None:
    from pymongo import MongoClient
    from pymongo.errors import OperationFailure

    from momentry_db.stores import mongo_users

    user = f"dev_{uuid.uuid4().hex[:8]}"
    dev, _ = mongo_env(tmp_path, auth_mongo, user, password="first-Pa55")
    mongo_users.grant(dev, auth_mongo)
    admin = MongoClient(auth_mongo)
    admin.admin.command("grantRolesToUser", user, roles=[{"role": "dbOwner", "db": "momentry_dev"}])
    dev2, _ = mongo_env(tmp_path, auth_mongo, user, password="second-Pa55")
    assert mongo_users.grant(dev2, auth_mongo) == [
        f"mongo dev: user {user} (in admin): updated with readWrite on momentry_dev only"]
    assert roles(auth_mongo, user) == [{"role": "readWrite", "db": "momentry_dev"}]
    old = MongoClient(dev.mongodb_url.reveal(), serverSelectionTimeoutMS=2000)
    with pytest.raises(OperationFailure, match="(?i)authentication failed") as caught:
        old.momentry_dev.x.find_one()
    assert caught.value.code == 18
    old.close()
    mongo_users.grant(dev2, auth_mongo, revoke=True)
    admin.close()


def test_mongo_grant_never_takes_over_another_environments_user(tmp_path, auth_mongo) -> None:
    from pymongo import MongoClient

    from momentry_db.stores import mongo_users

    user = f"prod_{uuid.uuid4().hex[:8]}"
    admin = MongoClient(auth_mongo)
    admin.admin.command("createUser", user, pwd="prod-Pa55", roles=[{"role": "readWrite", "db": "momentry"}])
    dev, prod = mongo_env(tmp_path, auth_mongo, user, password="prod-Pa55")
    for revoke in (False, True):
        with pytest.raises(RefusedError, match=rf"mongo user '{user}' already holds readWrite@momentry, beyond "
                                                r"dev's momentry_dev; it may be another environment's"):
            mongo_users.grant(dev, auth_mongo, revoke=revoke)
    assert roles(auth_mongo, user) == [{"role": "readWrite", "db": "momentry"}]
    # verify, logged in as that user for dev, names the violation
    result = VerifyResult("verify", "dev")
    mongo_users.check(result, dev, [prod])
    assert checks(result, "mongo") == [Check("mongo", f"login {user} is limited to momentry_dev", FAIL,
                                             f"{user} may not read its own database momentry_dev; run momentry-db "
                                             f"grant --env dev --store mongo; {user} may read prod's database momentry")]
    admin.admin.command("dropUser", user)
    admin.close()


def test_mongo_grant_refuses_an_admin_url_without_user_rights(tmp_path, auth_mongo) -> None:
    from momentry_db.stores import mongo_users

    user = f"dev_{uuid.uuid4().hex[:8]}"
    dev, _ = mongo_env(tmp_path, auth_mongo, user)
    mongo_users.grant(dev, auth_mongo)
    other, _ = mongo_env(tmp_path, auth_mongo, f"other_{uuid.uuid4().hex[:8]}", db="momentry_other")
    with pytest.raises(RefusedError, match=r"mongo: the administrative URL mongodb://dev_\w+:\*\*\*@127\.0\.0\.1:\d+/"
                                           r"\?authSource=admin&directConnection=true was refused \(not authorized"):
        mongo_users.grant(other, dev.mongodb_url.reveal())
    with pytest.raises(RefusedError, match=f"the administrative URL logs in as '{user}', the user grant would change"):
        mongo_users.grant(dev, dev.mongodb_url.reveal())
    mongo_users.grant(dev, auth_mongo, revoke=True)


def test_mongo_without_authentication_is_not_checkable_never_a_pass(tmp_path, mongo_url) -> None:
    from momentry_db.stores import mongo_users

    url = mongo_url.replace("mongodb://", "mongodb://dev:dev-Pa55@").replace("/?", "/?authSource=admin&")
    project = settings(tmp_path / "n", {"MONGODB_URL": url})
    result = VerifyResult("verify", "dev")
    mongo_users.check(result, project.environment("dev"), [project.environment("prod")])
    assert result.checks == [Check(
        "mongo", "login dev is limited to momentry_dev", NOT_CHECKABLE,
        "the server does not enforce authentication (a client with no login read momentry_dev), so no user is "
        "limited; turn authorization on (mongod --auth or security.authorization: enabled; secantusd-py --auth)")]
    for environ, detail in (({"MONGODB_URL": mongo_url}, "MONGODB_URL names no user; name a user of dev's own in it, "
                                                         "then run momentry-db grant --env dev --store mongo"),
                            ({}, "MONGODB_URL is not set; the embedded server runs without users")):
        project = settings(tmp_path / f"n{len(environ)}", environ)
        result = VerifyResult("verify", "dev")
        mongo_users.check(result, project.environment("dev"), [])
        assert [(c.status, c.detail) for c in result.checks] == [(NOT_CHECKABLE, detail)]


@pytest.mark.parametrize("url, message", [
    (None, "MONGODB_URL is not set for dev"),
    ("mongodb://127.0.0.1:1/?directConnection=true", "dev's MONGODB_URL names no user"),
    ("mongodb://someone@127.0.0.1:1/?authSource=admin", "dev's MONGODB_URL has no password for user 'someone'"),
])
def test_mongo_grant_needs_a_named_user_with_a_password_before_connecting(tmp_path, url, message) -> None:
    from momentry_db.stores import mongo_users

    project = settings(tmp_path / "p", {"MONGODB_URL": url} if url else {})
    with pytest.raises(ConfigError, match=message):
        mongo_users.grant(project.environment("dev"), "mongodb://root:pw@127.0.0.1:1/")


# --- Qdrant ---------------------------------------------------------------------------------------


class Spec:
    def __init__(self, name: str) -> None:
        self.name = name


def test_the_token_grants_read_write_on_the_environments_collections_only(tmp_path) -> None:
    from momentry_db.stores import qdrant_token

    dev = settings(tmp_path / "p", {"QDRANT_API_KEY": KEY}).environment("dev")
    now = time.time()
    signed, claims = qdrant_token.token(dev, [Spec("rule1"), Spec("frames")], expires_in=3600, now=now)
    expected = {"access": [{"collection": "momentry_dev_rule1", "access": "rw"},
                           {"collection": "momentry_dev_frames", "access": "rw"}], "exp": int(now) + 3600}
    assert claims == expected
    assert jwt.get_unverified_header(signed) == {"alg": "HS256", "typ": "JWT"}
    assert jwt.decode(signed, KEY, algorithms=["HS256"]) == expected
    with pytest.raises(jwt.InvalidSignatureError, match="Signature verification failed"):
        jwt.decode(signed, KEY + "x", algorithms=["HS256"])
    expired, _ = qdrant_token.token(dev, [Spec("rule1")], expires_in=60, now=now - 61)
    with pytest.raises(jwt.ExpiredSignatureError, match="Signature has expired"):
        jwt.decode(expired, KEY, algorithms=["HS256"])
    forever, claims = qdrant_token.token(dev, [Spec("rule1")])
    assert jwt.decode(forever, KEY, algorithms=["HS256"]) == claims == {
        "access": [{"collection": "momentry_dev_rule1", "access": "rw"}]}


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800),
                                           ("2w", 1209600), ("3650d", 315360000)])
def test_expiry_durations(text: str, seconds: int) -> None:
    from momentry_db.stores import qdrant_token

    assert qdrant_token.parse_duration(text) == seconds


@pytest.mark.parametrize("text, message", [
    ("0s", "must be between 1s and 3650d"), ("3651d", "must be between 1s and 3650d"),
    ("1y", "is not a duration"), ("", "is not a duration"), ("-1h", "is not a duration"), ("1.5h", "is not a duration"),
    ("h", "is not a duration"),
])
def test_bad_expiry_durations_are_refused(text: str, message: str) -> None:
    from momentry_db.stores import qdrant_token

    with pytest.raises(ConfigError, match=f"--expires-in {text!r} {message}"):
        qdrant_token.parse_duration(text)


def test_no_collection_means_no_token(tmp_path) -> None:
    from momentry_db.stores import qdrant_token

    dev = settings(tmp_path / "p", {"QDRANT_API_KEY": KEY}).environment("dev")
    with pytest.raises(ConfigError, match="no Qdrant collection is declared"):
        qdrant_token.token(dev, [])


def token_project(tmp_path: Path, environ: dict[str, str]) -> Project:
    root = tmp_path / "t"
    root.mkdir()
    (root / "qdrant_specs").mkdir()
    spec = (REPO / "qdrant_specs" / "rule1.toml").read_text()
    (root / "qdrant_specs" / "rule1.toml").write_text(spec)
    (root / "qdrant_specs" / "frames.toml").write_text(spec.replace('name = "rule1"', 'name = "frames"'))
    return Project(root, {**NO_EMBEDDED, "MOMENTRY_STATE_DIR": str(tmp_path / "state"), **environ})


def test_the_token_command_prints_only_the_token_on_stdout(tmp_path) -> None:
    project = token_project(tmp_path, {"QDRANT_API_KEY": KEY, "MOMENTRY_EXTRA_ENVS": "pr-7"})
    before = time.time()
    result = project.cli("token", "--env", "pr-7", "--expires-in", "2h")
    assert result.code == 0, result.err
    signed = result.out.strip()
    assert result.out == signed + "\n" and result.err == ""
    claims = jwt.decode(signed, KEY, algorithms=["HS256"])
    assert claims["access"] == [{"collection": "momentry_pr_7_frames", "access": "rw"},
                                {"collection": "momentry_pr_7_rule1", "access": "rw"}]
    assert int(before) + 7200 <= claims["exp"] <= time.time() + 7200
    assert KEY not in result.out + result.err

    forever = project.cli("token", "--env", "dev", "--json")
    doc = json.loads(forever.out)
    assert (doc["command"], doc["env"], doc["ok"], doc["expires_at"]) == ("token", "dev", True, None)
    assert jwt.decode(doc["token"], KEY, algorithms=["HS256"]) == {"access": doc["access"]}
    assert forever.err == ("qdrant: the token for dev does not expire; it is revoked only by changing the server's "
                           "API key (give --expires-in to bound it)\n")
    assert doc["token"] not in forever.err and KEY not in forever.out + forever.err


@pytest.mark.parametrize("args, environ, message", [
    (("--env", "dev"), {}, "error: QDRANT_API_KEY is not set for dev; a token is signed with the server's API key\n"),
    (("--env", "dev", "--expires-in", "soon"), {"QDRANT_API_KEY": KEY},
     "error: --expires-in 'soon' is not a duration: use a number with s, m, h, d or w (such as 30d)\n"),
    (("--env", "nowhere"), {"QDRANT_API_KEY": KEY}, "error: unknown environment 'nowhere'; known: prod, dev "
     "(declare more in momentry-db.toml [environments] or MOMENTRY_EXTRA_ENVS)\n"),
])
def test_the_token_command_refuses_in_one_line(tmp_path, args, environ, message) -> None:
    result = token_project(tmp_path, environ).cli("token", *args)
    assert (result.code, result.out, result.err) == (2, "", message)


# --- grant --store redis|mongo through the command line -------------------------------------------


@pytest.mark.redis
def test_grant_store_redis_through_the_cli_with_the_admin_url_masked(tmp_path, redis_url, redis_admin, tag) -> None:
    user = f"dev_{tag}"
    redis_project(tmp_path, redis_url, tag, user)  # env files in tmp_path / "p"
    project = Project(tmp_path / "p", {**NO_EMBEDDED, "MOMENTRY_STATE_DIR": str(tmp_path / "state")})
    admin = f"redis://default:Adm1n-S3cret@{redis_url.split('://', 1)[1]}"  # the default user has no password here
    assert redis_admin.acl_getuser(user) is None
    done = project.cli("grant", "--env", "dev", "--store", "redis", "--admin-url", admin, "--json")
    granted = document(done)
    assert (granted["command"], granted["env"], granted["store"], granted["user"], granted["revoke"]) == (
        "grant", "dev", "redis", user, False)
    assert granted["changed"][0].startswith(f"redis dev: created user {user}: keys t{tag}_dev:*, channels t{tag}_dev:*")
    assert redis_admin.acl_getuser(user)["keys"] == [f"~t{tag}_dev:*"]
    assert "Adm1n-S3cret" not in done.out + done.err and "pw-S3cret-1" not in done.out + done.err
    undone = project.cli("grant", "--env", "dev", "--store", "redis", "--revoke", env={"MOMENTRY_REDIS_ADMIN_URL": admin})
    assert (undone.code, undone.out.splitlines()[0]) == (0, f"redis dev: deleted user {user}")
    assert redis_admin.acl_getuser(user) is None


@pytest.mark.parametrize("args, message", [
    (("--store", "redis"), "grant --store redis needs an administrative URL: pass --admin-url URL or set "
                           "MOMENTRY_REDIS_ADMIN_URL"),
    (("--store", "mongo", "--login", "someone"), "grant --store mongo sets up the user named in dev's MONGODB_URL; "
                                                 "drop --login"),
    (("--admin-url", "redis://a:b@127.0.0.1:1/0"), "--admin-url is for --store redis or mongo; PostgreSQL grants "
                                                   "connect with DATABASE_URL"),
    (("--store", "qdrant"), "grant knows --store postgres, redis, mongo, not 'qdrant'"),
])
def test_grant_store_refusals_are_one_line_before_any_connection(tmp_path, args, message) -> None:
    project = Project(tmp_path, {**NO_EMBEDDED, "MOMENTRY_STATE_DIR": str(tmp_path / "state"),
                                 "REDIS_URL": "redis://dev_u:pw@127.0.0.1:1/0",
                                 "MONGODB_URL": "mongodb://dev_u:pw@127.0.0.1:1/"})
    result = project.cli("grant", "--env", "dev", *args)
    assert (result.code, result.out, result.err.strip()) == (2, "", f"error: {message}")


def test_grant_store_mongo_through_the_cli(tmp_path, auth_mongo) -> None:
    user = f"dev_{uuid.uuid4().hex[:8]}"
    mongo_env(tmp_path, auth_mongo, user)  # env files in tmp_path / "m"
    project = Project(tmp_path / "m", {**NO_EMBEDDED, "MOMENTRY_STATE_DIR": str(tmp_path / "state")})
    done = project.cli("grant", "--env", "dev", "--store", "mongo", env={"MOMENTRY_MONGO_ADMIN_URL": auth_mongo})
    assert (done.code, done.out.splitlines()) == (
        0, [f"mongo dev: user {user} (in admin): created with readWrite on momentry_dev only"]), done.err
    assert roles(auth_mongo, user) == [{"role": "readWrite", "db": "momentry_dev"}]
    assert "r00t-pass" not in done.out + done.err and "dev-Pa55" not in done.out + done.err
    undone = document(project.cli("grant", "--env", "dev", "--store", "mongo", "--revoke", "--admin-url", auth_mongo,
                                  "--json"))
    assert {k: v for k, v in undone.items() if k in ("store", "user", "revoke")} == {
        "store": "mongo", "user": user, "revoke": True}
    assert roles(auth_mongo, user) is None


def test_a_granted_mongo_login_migrates_and_verifies_its_own_database_through_the_cli(tmp_path, auth_mongo) -> None:
    from pymongo import MongoClient

    user = f"dev_{uuid.uuid4().hex[:8]}"
    mongo_env(tmp_path, auth_mongo, user)  # env files in tmp_path / "m"; prod logs in as the administrator
    (tmp_path / "m" / ".env").write_text(f"MONGODB_URL={auth_mongo}\n")
    project = Project(tmp_path / "m", {**NO_EMBEDDED, "MOMENTRY_STATE_DIR": str(tmp_path / "state"),
                                       "MOMENTRY_MONGO_ADMIN_URL": auth_mongo})
    assert project.cli("grant", "--env", "dev", "--store", "mongo").code == 0
    admin = MongoClient(auth_mongo)
    prod_before = sorted(admin.momentry.list_collection_names())
    migrated = project.cli("migrate", "--env", "dev", "--store", "mongo")
    assert migrated.code == 0, migrated.out + migrated.err
    verified = project.cli("verify", "--env", "dev", "--store", "mongo")
    lines = verified.out.splitlines()
    assert verified.code == 0, verified.out + verified.err
    assert "ok   mongo    database momentry_dev exists" in lines
    assert any(line.startswith(f"ok   mongo    login {user} is limited to momentry_dev") for line in lines), lines
    assert sorted(admin.momentry.list_collection_names()) == prod_before
    assert project.cli("grant", "--env", "dev", "--store", "mongo", "--revoke").code == 0
    admin.close()

"""Secrets never shown: passwords holding any character, in every connection-string form, on
every command's success and error paths, as text and JSON, and through plain alembic."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from momentry_db.environments import mask_url, scrub
from momentry_db.settings import normalize_database_url

# A password is made of distinctive chunks (never found in normal output) joined by the
# characters that break naive masking. No chunk may appear anywhere in the output.
CHUNK = st.from_regex(r"[A-Z]{2}[0-9]{2}[A-Z]", fullmatch=True)
SPECIAL = st.sampled_from(["/", "@", ":", "?", "#", "%", " ", "'", "\\", "%2F", "@@", "//", ":@"])
PASSWORD = st.builds(lambda parts, tail: "".join(p for pair in parts for p in pair) + tail,
                     st.lists(st.tuples(CHUNK, SPECIAL), min_size=1, max_size=4), CHUNK | SPECIAL)
FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

CLOSED = "127.0.0.1:1"  # nothing listens: connections are refused at once
SCHEMES = {"DATABASE_URL": "postgresql", "MONGODB_URL": "mongodb", "QDRANT_URL": "http", "REDIS_URL": "redis"}
# Parameters whose value is a secret; AWS_SESSION_TOKEN is a NAME:VALUE pair in authMechanismProperties.
SECRET_PARAMS = ("sslpassword", "tlsCertificateKeyFilePassword", "ssl_password", "api_key", "apikey",
                 "access_token", "client_secret", "AWS_SESSION_TOKEN")
URL_FORMS = ("raw", "encoded", "no user", "no scheme", "parameter", *(f"parameter {p}" for p in SECRET_PARAMS))


def chunks(password: str) -> list[str]:
    return re.findall(r"[A-Z]{2}[0-9]{2}[A-Z]", password)


def shown(password: str, output: str) -> list[str]:
    """The pieces of ``password`` that appear in ``output``."""
    return [c for c in chunks(password) if c in output]


def url(var: str, form: str, password: str) -> str:
    """A connection URL for ``var`` carrying ``password`` in the given form, at a closed port."""
    scheme = SCHEMES[var]
    path = {"DATABASE_URL": "/momentry", "REDIS_URL": "/0", "MONGODB_URL": "/", "QDRANT_URL": ""}[var]
    if form == "raw":  # unencoded, as people paste it
        return f"{scheme}://app:{password}@{CLOSED}{path}"
    if form == "encoded":
        return f"{scheme}://app:{quote(password, safe='')}@{CLOSED}{path}"
    if form == "no user":
        return f"{scheme}://:{password}@{CLOSED}{path}"
    if form == "no scheme":  # user:password@host, as people paste it without the scheme
        return f"app:{password}@{CLOSED}{path}"
    name = form.partition(" ")[2] or "password"
    if name == "AWS_SESSION_TOKEN":
        return (f"{scheme}://{CLOSED}{path}?authMechanism=MONGODB-AWS"
                f"&authMechanismProperties=SERVICE_NAME:x,AWS_SESSION_TOKEN:{quote(password, safe='')}")
    return f"{scheme}://{CLOSED}{path}?sslmode=disable&{name}={quote(password, safe='')}"


def dsn(password: str, quoted: bool) -> str:
    """A libpq key/value DSN with ``password`` quoted (\\' and \\\\ escapes) or backslash-escaped."""
    if quoted:
        value = "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"
    else:
        value = re.sub(r"([\\\s'])", r"\\\1", password)
    return f"host=127.0.0.1 port=1 user=app password={value} dbname=momentry"


def database_url(kind: str, password: str) -> str:
    if kind.startswith("dsn"):
        return dsn(password, quoted=kind == "dsn quoted")
    return url("DATABASE_URL", kind, password)


DB_FORMS = st.sampled_from([*URL_FORMS, "dsn quoted", "dsn unquoted"])
FORM = st.sampled_from(URL_FORMS)


# --- the masking functions ---------------------------------------------------------------------


@FAST
@given(password=PASSWORD, var=st.sampled_from(list(SCHEMES)), form=FORM)
def test_mask_url_hides_a_password_of_any_characters_in_every_url_form(password: str, var: str,
                                                                      form: str) -> None:
    from momentry_db.environments import secret_parts
    from momentry_db.settings import secret_values

    value = url(var, form, password)
    masked = mask_url(value)
    assert shown(password, masked) == []
    assert "***" in masked and CLOSED in masked  # the host stays readable
    assert secret_parts(value)  # the password is found, for the known-secret backstop
    message = f"cannot connect to {value}: refused ({value!r})"
    assert shown(password, scrub(message, secret_values(var, value))) == []
    # In free text a URL ends at whitespace, and only a scheme tells a URL from other words; a
    # setting written without one is hidden as a known secret (above) and refused as input.
    if not re.search(r"\s", value) and form != "no scheme":
        assert shown(password, scrub(message, [])) == []


@FAST
@given(password=PASSWORD, quoted=st.booleans())
@example(password="AA00A/\\", quoted=True)  # a quoted value ending in an escaped backslash: '...\\'
@example(password="AA00A/\\", quoted=False)
@example(password="AA00A'\\ BB11B\\", quoted=True)
def test_mask_url_hides_a_dsn_password_with_libpq_quoting(password: str, quoted: bool) -> None:
    from psycopg.conninfo import conninfo_to_dict

    from momentry_db.environments import _unquote_dsn, secret_parts

    value = dsn(password, quoted)
    assert mask_url(value) == "host=127.0.0.1 port=1 user=app password=*** dbname=momentry"
    read = conninfo_to_dict(value)["password"]  # libpq itself is the oracle
    assert read == password
    assert secret_parts(value)[0] == read
    raw = value.split("password=", 1)[1].rsplit(" dbname=", 1)[0]
    assert _unquote_dsn(raw) == read  # the hand parser, used when libpq refuses the string, agrees
    assert read in secret_parts(value + " apikey=x")  # libpq refuses the unknown option
    assert shown(password, scrub(f"DATABASE_URL {value!r} is not a URL", [])) == []


@pytest.mark.parametrize("value", ["postgresql://h:1/db?sslmode=disable&password=AA00A%2F%2F",
                                   "postgresql://h:1/db?password=AA00A\"BB11B", "redis://h:1/0?token=AA00A'"])
def test_scrub_keeps_the_quotes_a_url_is_shown_in(value: str) -> None:
    masked = mask_url(value)
    as_json = json.dumps({"url": value, "next": 1}, indent=2)
    assert json.loads(scrub(as_json, [])) == {"url": masked, "next": 1}
    assert json.loads(scrub(json.dumps({"url": masked}), [])) == {"url": masked}
    assert scrub(f"DATABASE_URL '{value}' is not a URL", []) == f"DATABASE_URL '{masked}' is not a URL"


def test_a_password_with_an_at_sign_reaches_the_driver_whole() -> None:
    from sqlalchemy.engine import make_url

    parsed = make_url(normalize_database_url("postgresql://app:S3c@r:et@db.example:5433/momentry"))
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.database) == (
        "app", "S3c@r:et", "db.example", 5433, "momentry")
    kept = make_url(normalize_database_url("postgresql://app:pw@db/momentry?application_name=me@laptop"))
    assert (kept.password, kept.host, kept.query["application_name"]) == ("pw", "db", "me@laptop")


# --- what a user sees ---------------------------------------------------------------------------


def test_envs_masks_passwords_with_unencoded_delimiters(project) -> None:
    env = {"DATABASE_URL": "postgresql://u:S3c/ret@127.0.0.1:1/db",
           "MONGODB_URL": "mongodb://u:M0/n@go@127.0.0.1:1/",
           "REDIS_URL": "redis://:R3d/is?x#y@127.0.0.1:1/0",
           "QDRANT_URL": "http://u:Q/d:r4nt@127.0.0.1:1"}
    result = project.cli("envs", "--json", env=env)
    assert result.code == 0, result.err
    dev = {r["name"]: r for r in json.loads(result.out)["environments"]}["dev"]
    assert [dev[k] for k in ("database_url", "mongodb_url", "redis_url", "qdrant_url")] == [
        "postgresql+psycopg://u:***@127.0.0.1:1/db", "mongodb://u:***@127.0.0.1:1/",
        "redis://:***@127.0.0.1:1/0", "http://u:***@127.0.0.1:1"]
    text = project.cli("envs", env=env)
    assert text.code == 0
    for secret in ("S3c/ret", "ret@", "M0/n", "go@", "R3d/is", "Q/d", "r4nt"):
        assert secret not in result.out + result.err + text.out + text.err


@pytest.mark.parametrize("how", ["environment", "flag"])
def test_a_dsn_database_url_is_refused_with_its_password_masked(project, how: str) -> None:
    value = "host=127.0.0.1 port=1 user=u password='pass w\\'ord' dbname=x"
    args = ["--database-url", value] if how == "flag" else []
    result = project.cli("status", "--env", "dev", "--json", *args,
                         env={"DATABASE_URL": value} if how == "environment" else None)
    assert result.code == 2
    expected = ("DATABASE_URL 'host=127.0.0.1 port=1 user=u password=*** dbname=x' is not a PostgreSQL URL; "
                "use postgres://, postgresql:// or postgresql+psycopg://")
    assert result.err == f"error: {expected}\n"
    assert json.loads(result.out)["error"]["message"] == expected


def test_unreachable_postgres_error_masks_a_password_with_a_slash(project) -> None:
    result = project.cli("status", "--env", "dev", "--store", "postgres",
                         env={"DATABASE_URL": "postgresql://u:S3c/ret@127.0.0.1:1/db"})
    assert result.code == 2
    assert result.err.startswith("error: postgres: cannot connect to postgresql+psycopg://u:***@127.0.0.1:1/db: ")
    assert "S3c" not in result.err and "ret@" not in result.err


def test_mongo_url_with_an_unencoded_password_is_refused_masked(project) -> None:
    result = project.cli("status", "--env", "dev", "--store", "mongo",
                         env={"MONGODB_URL": "mongodb://u:M0/ngo@127.0.0.1:1/"})
    assert result.code == 2
    assert result.err.startswith("error: MONGODB_URL 'mongodb://u:***@127.0.0.1:1/' is invalid: ")
    assert "M0" not in result.err and "ngo@" not in result.err


def test_verify_masks_a_malformed_redis_url(project) -> None:
    result = project.cli("verify", "--env", "dev", "--store", "redis", env={"REDIS_URL": "rediss:://u:pw@"})
    assert result.code == 1
    line = next(line for line in result.out.splitlines() if "keys under the prefix" in line)
    assert line.startswith("FAIL redis    keys under the prefix: cannot reach rediss:://u:***@: ")
    assert ":pw@" not in result.out + result.err


COMMANDS = [
    ["migrate", "--env", "dev"], ["plan", "--env", "dev"], ["status", "--env", "dev"],
    ["check", "--env", "dev"], ["verify", "--env", "dev"], ["lint", "--env", "dev"],
    ["history", "--env", "dev"], ["adopt", "--env", "dev"], ["downgrade", "--env", "dev", "--to", "base"],
    ["reset", "--env", "dev", "--yes"], ["clone", "--from", "prod", "--to", "dev"],
    ["env-file", "--env", "dev", "--check"], ["envs"], ["migrate", "--all"],
    ["status", "--env", "dev", "--store", "mongo"], ["status", "--env", "dev", "--store", "qdrant"],
    ["verify", "--env", "dev", "--store", "redis"],
]


@pytest.fixture
def quick_mongo(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreachable MongoDB fails in 0.3 s instead of 5, so many examples stay fast."""
    monkeypatch.setattr("momentry_db.stores.mongo.TIMEOUT_MS", 300)


@FAST
@given(password=PASSWORD, key=CHUNK, args=st.sampled_from(COMMANDS), as_json=st.booleans(),
       db_form=DB_FORMS, forms=st.fixed_dictionaries({v: FORM for v in SCHEMES if v != "DATABASE_URL"}),
       database_url_flag=st.booleans())
# Qdrant's URL parser (urllib3) ends the user info at a backslash and quotes the piece before it.
@example(password="AA00A\\/", key="AA00A", args=["verify", "--env", "dev"], as_json=False, db_form="raw",
         forms={"MONGODB_URL": "raw", "QDRANT_URL": "raw", "REDIS_URL": "raw"}, database_url_flag=False)
# The structural pass over JSON output ran a password= parameter on over the closing '",'.
@example(password="AA00A//", key="AA00A", args=["envs"], as_json=True, db_form="parameter",
         forms={"MONGODB_URL": "raw", "QDRANT_URL": "raw", "REDIS_URL": "raw"}, database_url_flag=False)
def test_no_command_shows_a_password_in_any_form(project, quick_mongo, password: str, key: str,
                                                args: list[str], as_json: bool, db_form: str,
                                                forms: dict[str, str], database_url_flag: bool) -> None:
    env = {var: url(var, form, password) for var, form in forms.items()}
    env["QDRANT_API_KEY"] = key + password
    db = database_url(db_form, password)
    takes_url = args[0] in ("plan", "status", "check", "verify", "lint") or args == ["migrate", "--env", "dev"]
    if database_url_flag and takes_url:
        args = [*args, "--database-url", db]
        env["DATABASE_URL"] = url("DATABASE_URL", "raw", password)
    else:
        env["DATABASE_URL"] = db
    result = project.cli(*args, *(["--json"] if as_json else []), env=env)
    output = result.out + result.err
    assert shown(password, output) == [] and key not in output, (args, output)
    assert "Traceback" not in output
    if as_json and result.out.strip():
        json.loads(result.out)


@pytest.mark.parametrize("database_url", [
    "host=127.0.0.1 port=1 user=u password='QZ7 WK8\\'PVX' dbname=x",
    "postgresql://u:QZ7 WK8/PVX@127.0.0.1:1/db",
    "postgresql://u:QZ7@WK8:PVX@127.0.0.1:1/db",
])
@pytest.mark.parametrize("x_args", [["-x", "schema=dev"], []])
def test_plain_alembic_never_shows_the_password(project, database_url: str, x_args: list[str]) -> None:
    result = project.alembic(*x_args, "upgrade", "head", env={"DATABASE_URL": database_url})
    assert result.code == 2
    output = result.out + result.err
    assert "error: " in result.err and "Traceback" not in output
    for piece in ("QZ7", "WK8", "PVX"):
        assert piece not in output, output


def test_momentry_db_subprocess_masks_a_dsn_option(project) -> None:
    result = project.momentry_db("--project-dir", str(project.root), "status", "--env", "dev",
                                 "--database-url", "host=127.0.0.1 password=Zk9-secret-Q dbname=x")
    assert result.code == 2
    assert "Zk9" not in result.out + result.err and "password=***" in result.err


# --- settings written without a scheme -----------------------------------------------------------


NO_SCHEME = [
    ("DATABASE_URL", "u:Zq9SECRETa@127.0.0.1:5432/attack_a",
     ("DATABASE_URL 'u:***@127.0.0.1:5432/attack_a' is not a PostgreSQL URL; "
      "use postgres://, postgresql:// or postgresql+psycopg://")),
    ("MONGODB_URL", "u:Zq9SECRETh@127.0.0.1:27555",
     "MONGODB_URL 'u:***@127.0.0.1:27555' has no scheme; use mongodb:// or mongodb+srv://"),
    ("QDRANT_URL", "u:Zq9SECRETe@127.0.0.1:6333",
     "QDRANT_URL 'u:***@127.0.0.1:6333' has no scheme; use http:// or https://"),
    ("REDIS_URL", "u:Zq9SECRETf@127.0.0.1:6379/14",
     "REDIS_URL 'u:***@127.0.0.1:6379/14' has no scheme; use redis://, rediss:// or unix://"),
]


@pytest.mark.parametrize("variable,value,expected", NO_SCHEME)
def test_a_setting_with_no_scheme_is_masked_from_its_raw_text(variable: str, value: str, expected: str) -> None:
    from momentry_db.environments import secret_parts
    from momentry_db.settings import secret_values

    masked = value.replace(value[value.index(":") + 1:value.rindex("@")], "***")
    assert mask_url(value) == masked
    assert secret_parts(value) == [value[value.index(":") + 1:value.rindex("@")]]
    assert scrub(f"cannot reach {value}", secret_values(variable, value)) == f"cannot reach {masked}"


@pytest.mark.parametrize("variable,value,expected", NO_SCHEME)
@pytest.mark.parametrize("args", [["envs"], ["verify", "--env", "dev"], ["status", "--env", "dev"]])
def test_a_setting_with_no_scheme_is_refused_masked(project, variable: str, value: str, expected: str,
                                                    args: list[str]) -> None:
    text = project.cli(*args, env={variable: value})
    assert (text.code, text.err, text.out) == (2, f"error: {expected}\n", "")
    as_json = project.cli(*args, "--json", env={variable: value})
    assert as_json.code == 2
    assert json.loads(as_json.out)["error"]["message"] == expected
    assert "Zq9SECRET" not in as_json.out + as_json.err


def test_plain_alembic_refuses_a_database_url_with_no_scheme_masked(project) -> None:
    result = project.alembic("-x", "schema=dev", "upgrade", "head",
                             env={"DATABASE_URL": "u:Zq9SECRETa@127.0.0.1:5432/attack_a"})
    assert result.code == 2
    assert "DATABASE_URL 'u:***@127.0.0.1:5432/attack_a' is not a PostgreSQL URL" in result.err
    assert "Zq9SECRET" not in result.out + result.err


# --- parameters that hold a secret ---------------------------------------------------------------


@pytest.mark.parametrize("value,masked,secrets", [
    ("mongodb://127.0.0.1:27555/?directConnection=true&tlsCertificateKeyFilePassword=Zq9SECRETb",
     "mongodb://127.0.0.1:27555/?directConnection=true&tlsCertificateKeyFilePassword=***", ["Zq9SECRETb"]),
    ("redis://127.0.0.1:6379/14?password=x&ssl_password=Zq9SECRETj",
     "redis://127.0.0.1:6379/14?password=***&ssl_password=***", ["x", "Zq9SECRETj"]),
    (("mongodb://AKIAXX:Zq9SECRETc@127.0.0.1:27555/?authMechanism=MONGODB-AWS"
      "&authMechanismProperties=AWS_SESSION_TOKEN:Zq9SECRETd"),
     "mongodb://AKIAXX:***@127.0.0.1:27555/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:***",
     ["Zq9SECRETc", "Zq9SECRETd"]),
    ("mongodb://h:1/?authMechanismProperties=SERVICE_NAME:db,AWS_SESSION_TOKEN%3AZq9SECRETd",
     "mongodb://h:1/?authMechanismProperties=SERVICE_NAME:db,AWS_SESSION_TOKEN%3A***", ["Zq9SECRETd"]),
    ("postgresql://h:1/db?sslpassword=Zq9SECRETk&sslmode=require", "postgresql://h:1/db?sslpassword=***&sslmode=require",
     ["Zq9SECRETk"]),
    ("http://h:1/?API_KEY=Zq9SECRETl&apikey=Zq9SECRETm&access_token=Zq9SECRETn&client_secret=Zq9SECRETo",
     "http://h:1/?API_KEY=***&apikey=***&access_token=***&client_secret=***",
     ["Zq9SECRETl", "Zq9SECRETm", "Zq9SECRETn", "Zq9SECRETo"]),
])
def test_every_parameter_named_for_a_secret_is_masked(value: str, masked: str, secrets: list[str]) -> None:
    from momentry_db.environments import secret_parts

    assert mask_url(value) == masked
    assert set(secret_parts(value)) == set(secrets)
    assert scrub(f"cannot reach {value} ({value!r})", []) == f"cannot reach {masked} ({masked!r})"
    assert json.loads(scrub(json.dumps({"url": value}), [])) == {"url": masked}


SECRET_PARAMETERS = {
    "MONGODB_URL": "mongodb://AKIAXX:Zq9SECRETc@127.0.0.1:1/?authMechanism=MONGODB-AWS"
                   "&authMechanismProperties=AWS_SESSION_TOKEN:Zq9SECRETd&tlsCertificateKeyFilePassword=Zq9SECRETb",
    "REDIS_URL": "redis://127.0.0.1:1/14?password=x&ssl_password=Zq9SECRETj",
}


def test_envs_masks_every_secret_parameter(project) -> None:
    result = project.cli("envs", "--json", env=SECRET_PARAMETERS)
    assert result.code == 0, result.err
    dev = {r["name"]: r for r in json.loads(result.out)["environments"]}["dev"]
    assert (dev["mongodb_url"], dev["redis_url"]) == (
        ("mongodb://AKIAXX:***@127.0.0.1:1/?authMechanism=MONGODB-AWS"
         "&authMechanismProperties=AWS_SESSION_TOKEN:***&tlsCertificateKeyFilePassword=***"),
        "redis://127.0.0.1:1/14?password=***&ssl_password=***")
    assert "Zq9SECRET" not in result.out + result.err


@pytest.mark.parametrize("args", [["verify", "--env", "dev"], ["status", "--env", "dev", "--json"]])
def test_commands_never_show_a_secret_parameter(project, quick_mongo, args: list[str]) -> None:
    result = project.cli(*args, env=SECRET_PARAMETERS)
    assert result.code in (1, 2), result.err
    assert "Zq9SECRET" not in result.out + result.err
    assert "Traceback" not in result.out + result.err


# --- a PostgreSQL password holding '@' and '/' or '?' ---------------------------------------------


@pytest.mark.parametrize("given,user,password,host,port,database", [
    ("postgresql://postgres:S3c/re@tXY@127.0.0.1:5432/attack_a", "postgres", "S3c/re@tXY", "127.0.0.1", 5432,
     "attack_a"),
    ("postgresql://u:a@evil.example:5432/x@127.0.0.1:5432/db", "u", "a@evil.example:5432/x", "127.0.0.1", 5432, "db"),
    ("postgres://u:p?w#x:y@db.example:5433/m", "u", "p?w#x:y", "db.example", 5433, "m"),
    ("postgresql://u:1234/x@h/db", "u", "1234/x", "h", None, "db"),
    ("postgresql://u:12#x@h/db", "u", "12#x", "h", None, "db"),
    ("postgresql://u:p@ss?w@h:7/db", "u", "p@ss?w", "h", 7, "db"),
    ("postgresql://app:S3c@r:et@db.example:5433/momentry", "app", "S3c@r:et", "db.example", 5433, "momentry"),
    ("postgresql://u:pw@db/m?application_name=me@x", "u", "pw", "db", None, "m"),
    ("postgresql://db/m?application_name=me@x", None, None, "db", None, "m"),
    ("postgresql://u:p@[::1]:5432/db", "u", "p", "::1", 5432, "db"),
    ("postgresql://u:S3c%2Fret@h/db", "u", "S3c/ret", "h", None, "db"),
])
def test_the_driver_gets_the_intended_host_and_whole_password(given: str, user, password, host, port,
                                                              database) -> None:
    from sqlalchemy.engine import make_url

    from momentry_db.settings import check_url

    parsed = make_url(normalize_database_url(check_url("DATABASE_URL", given)))
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.database) == (
        user, password, host, port, database)


@pytest.mark.parametrize("password", ["S3c/re@tXY", "a@evil.example:5432/x", "Zq9?re@tXY"])
def test_a_password_with_at_and_slash_reaches_the_right_host(project, password: str) -> None:
    value = f"postgresql://postgres:{password}@127.0.0.1:1/attack_a"
    result = project.cli("status", "--env", "dev", "--store", "postgres", env={"DATABASE_URL": value})
    assert result.code == 2
    reached = 'connection to server at "127.0.0.1", port 1 failed: Connection refused'  # not evil.example
    assert result.err == ("error: postgres: cannot connect to postgresql+psycopg://postgres:***@127.0.0.1:1/"
                          f"attack_a: connection failed: {reached}\n")
    for piece in ("S3c", "tXY", "evil", "Zq9"):
        assert piece not in result.out + result.err
    alembic = project.alembic("-x", "schema=dev", "upgrade", "head", env={"DATABASE_URL": value})
    assert alembic.code == 2 and reached in alembic.err, alembic.err
    for piece in ("S3c", "tXY", "evil", "Zq9"):
        assert piece not in alembic.out + alembic.err

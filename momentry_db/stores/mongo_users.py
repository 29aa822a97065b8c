"""MongoDB users: one per environment with readWrite on its database only, and the verify check.

The user name and password come from the environment's MONGODB_URL; the user lives in the database
that URL authenticates against (``authSource``, else the URL's database, else ``admin``), as pymongo
reads it, so the same URL logs in. Users are managed through an administrative URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..environments import Environment, mask_url, scrub, secret_parts
from ..errors import ConfigError, RefusedError, UnreachableError
from .mongo import TIMEOUT_MS, unreachable_reason

STORE = "mongo"
PROBE = "momentry_acl_probe"  # a collection read (never written) by the verify check
UNAUTHORIZED = 13
COMMAND_NOT_FOUND = 59


@dataclass(frozen=True)
class Login:
    """The user, password and authentication database a MongoDB URL logs in with."""

    user: str | None
    password: str | None
    auth_db: str
    nodes: tuple[str, ...]
    options: tuple[tuple[str, Any], ...]


def login(url: str) -> Login:
    """Read a MongoDB URL as pymongo does: its user, password and authentication database."""
    from pymongo.errors import ConfigurationError, InvalidURI
    from pymongo.uri_parser import parse_uri

    try:
        parsed = parse_uri(url)
    except (ConfigurationError, InvalidURI, ValueError) as exc:
        raise ConfigError(f"MongoDB URL {mask_url(url)!r} is invalid: {scrub(str(exc), secret_parts(url))}") from None
    options = parsed["options"]
    auth_db = options.get("authSource") or parsed["database"] or "admin"
    return Login(parsed["username"], parsed["password"], auth_db,
                 tuple(f"{host}:{port}" for host, port in parsed["nodelist"]),
                 tuple((k, v) for k, v in options.items() if not k.lower().startswith("auth")))


def _client(url: str) -> Any:
    from pymongo import MongoClient

    return MongoClient(url, serverSelectionTimeoutMS=TIMEOUT_MS, connectTimeoutMS=TIMEOUT_MS)


def grant(env: Environment, admin_url: str, *, revoke: bool = False) -> list[str]:
    """Create or update the user in MONGODB_URL with readWrite on the environment's database only;
    with revoke, drop it."""
    from pymongo.errors import OperationFailure, PyMongoError

    if env.mongodb_url is None:
        raise ConfigError(f"MONGODB_URL is not set for {env.name}; grant sets up the user it names "
                          "(mongodb://USER:PASSWORD@host:port/?authSource=admin)")
    who = login(env.mongodb_url.reveal())
    if not who.user:
        raise ConfigError(f"{env.name}'s MONGODB_URL names no user; add one "
                          f"(mongodb://USER:PASSWORD@host:port/?authSource=admin) for grant to limit to "
                          f"{env.mongo_database}")
    if not who.password and not revoke:
        raise ConfigError(f"{env.name}'s MONGODB_URL has no password for user {who.user!r}; add one")
    admin = login(admin_url)
    if (admin.user, admin.auth_db) == (who.user, who.auth_db):
        raise RefusedError(f"the administrative URL logs in as {who.user!r}, the user grant would change; "
                           "use an administrator of its own")
    secrets = [*env.secrets(), *secret_parts(admin_url)]
    shown = mask_url(admin_url)
    where = f"mongo {env.name}: user {who.user} (in {who.auth_db})"
    client = _client(admin_url)
    try:
        try:
            client.admin.command("ping")
        except OperationFailure:
            pass  # answers, but wants a login first: the commands below tell
        db = client[who.auth_db]
        users = db.command("usersInfo", {"user": who.user, "db": who.auth_db}).get("users", [])
        current = users[0] if users else None
        if current is not None:
            _refuse_foreign(env, who.user, current)
        if revoke:
            if current is None:
                return [f"{where} does not exist; nothing to revoke"]
            db.command("dropUser", who.user)
            return [f"{where}: dropped"]
        roles = [{"role": "readWrite", "db": env.mongo_database}]
        if current is None:
            db.command("createUser", who.user, pwd=who.password, roles=roles)
        else:
            db.command("updateUser", who.user, pwd=who.password, roles=roles)
        return [f"{where}: {'updated' if current is not None else 'created'} with readWrite on "
                f"{env.mongo_database} only"]
    except OperationFailure as exc:
        reason = scrub(str(exc.details.get("errmsg") if exc.details else exc), secrets)
        if exc.code == COMMAND_NOT_FOUND:
            raise RefusedError(f"mongo: the server at {shown} does not support users ({reason})") from None
        raise RefusedError(f"mongo: the administrative URL {shown} was refused ({reason}); it needs a user "
                           "allowed to manage users (userAdmin or root)") from None
    except PyMongoError as exc:
        raise UnreachableError(f"mongo: cannot reach {shown}: {unreachable_reason(exc, secrets)}") from None
    finally:
        client.close()


def _refuse_foreign(env: Environment, user: str, current: dict[str, Any]) -> None:
    """A user holding roles on other databases may be another environment's: never take it over."""
    foreign = [f"{r.get('role')}@{r.get('db')}" for r in current.get("roles", []) if r.get("db") != env.mongo_database]
    if foreign:
        raise RefusedError(f"mongo user {user!r} already holds {', '.join(foreign)}, beyond {env.name}'s "
                           f"{env.mongo_database}; it may be another environment's or an administrator's login: "
                           f"give {env.name} a user of its own in MONGODB_URL")


# --- verify ------------------------------------------------------------------------------------


def check(result: Any, env: Environment, others: list[Environment]) -> None:
    """As MONGODB_URL's user: its own database reads, every other environment's is Unauthorized.

    Where the server does not enforce authentication, no user is limited: not checkable, never a pass.
    """
    from pymongo import MongoClient
    from pymongo.errors import OperationFailure, PyMongoError

    from ..verify import NOT_CHECKABLE

    if env.mongodb_url is None:
        result.add(STORE, f"login is limited to {env.mongo_database}", status=NOT_CHECKABLE,
                   detail="MONGODB_URL is not set; the embedded server runs without users")
        return
    who = login(env.mongodb_url.reveal())
    name = f"login {who.user + ' ' if who.user else ''}is limited to {env.mongo_database}"
    grant_hint = f"run momentry-db grant --env {env.name} --store mongo"
    if not who.user:
        result.add(STORE, name, status=NOT_CHECKABLE,
                   detail=f"MONGODB_URL names no user; name a user of {env.name}'s own in it, then {grant_hint}")
        return
    secrets = env.secrets()
    anonymous: Any = MongoClient(list(who.nodes), serverSelectionTimeoutMS=TIMEOUT_MS,
                                 connectTimeoutMS=TIMEOUT_MS, **dict(who.options))
    user = _client(env.mongodb_url.reveal())
    try:
        try:
            anonymous[env.mongo_database][PROBE].find_one()
            result.add(STORE, name, status=NOT_CHECKABLE,
                       detail=f"the server does not enforce authentication (a client with no login read "
                              f"{env.mongo_database}), so no user is limited; turn authorization on "
                              "(mongod --auth or security.authorization: enabled; secantusd-py --auth)")
            return
        except OperationFailure as exc:
            if exc.code != UNAUTHORIZED:
                raise
        problems = []
        try:
            user[env.mongo_database][PROBE].find_one()
        except OperationFailure as exc:
            if exc.code != UNAUTHORIZED:
                raise
            problems.append(f"{who.user} may not read its own database {env.mongo_database}; {grant_hint}")
        for other in others:
            try:
                user[other.mongo_database][PROBE].find_one()
            except OperationFailure as exc:
                if exc.code == UNAUTHORIZED:
                    continue
                raise
            problems.append(f"{who.user} may read {other.name}'s database {other.mongo_database}")
        result.add(STORE, name, problems,
                   ok_detail="own database read; Unauthorized on "
                             + (", ".join(f"{o.name}'s {o.mongo_database}" for o in others) or "no other database"))
    except OperationFailure as exc:
        reason = scrub(str(exc.details.get("errmsg") if exc.details else exc), secrets)
        result.add(STORE, name, [f"cannot log in as {who.user} or read as it: {reason}; {grant_hint}"])
    except PyMongoError as exc:
        result.add(STORE, name, [f"cannot reach {env.mongodb_url.masked}: {unreachable_reason(exc, secrets)}"])
    finally:
        anonymous.close()
        user.close()

"""Redis ACL users: one per environment, limited to its key prefix, and the verify check that proves it.

The user name and password come from the environment's REDIS_URL; the ACL is set through an
administrative URL. What the user may run is ``RULES`` below: every command except the dangerous
ones (KEYS, FLUSHALL, FLUSHDB, CONFIG, DEBUG, SHUTDOWN, MODULE, ACL, MONITOR, SAVE, REPLICAOF,
CLIENT KILL/LIST/PAUSE, SWAPDB, MIGRATE, RESTORE, SORT, INFO, ...; Redis's ``@dangerous``
category, which holds ``@admin``) and the scripting commands that act on the whole server
(FUNCTION, SCRIPT FLUSH, SCRIPT KILL): a dev login could otherwise delete prod's functions or kill
its scripts. EVAL and FCALL stay: Redis 7 checks the keys a script touches against the same ACL.
SCAN stays too (momentry-db's reset uses it): it lists key names across the keyspace, never values.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from ..environments import Environment, scrub, secret_parts
from ..errors import ConfigError, RefusedError, UnreachableError

TIMEOUT_S = 5
STORE = "redis"
#: What an environment's user may run, after ``reset``. See the module's docstring for why.
RULES = ("+@all", "-@dangerous", "-function", "-script|flush", "-script|kill")
PROBE = "momentry-db:acl-probe:"  # probe keys: under the environment's prefix, gone within a minute


@dataclass(frozen=True)
class Login:
    """The user name and password a Redis URL logs in with."""

    user: str
    password: str | None

    @property
    def default(self) -> bool:
        return self.user == "default"


def login(url: str) -> Login:
    """The login a Redis URL uses, as redis-py reads it (no user name means the default user)."""
    from redis.connection import parse_url

    try:
        parsed = parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL cannot be read: {scrub(str(exc), secret_parts(url))}") from None
    return Login(parsed.get("username") or "default", parsed.get("password"))


def setuser_args(user: str, password: str, prefix: str) -> list[str]:
    """ACL SETUSER's arguments: a reset, then the password, the prefix's keys and channels, the rules.

    ``reset`` clears everything the user had (passwords, keys, channels, selectors, commands), so a
    second grant leaves exactly this, never what an earlier one or a hand-made rule added.
    """
    return ["ACL", "SETUSER", user, "reset", "on", f">{password}", f"~{prefix}*", f"&{prefix}*", *RULES]


def grant(env: Environment, admin_url: str, *, revoke: bool = False) -> list[str]:
    """Limit the user in REDIS_URL to the environment's prefix (ACL SETUSER); with revoke, delete it."""
    import redis

    if env.redis_url is None:
        raise ConfigError(f"REDIS_URL is not set for {env.name}; grant sets up the user it names "
                          f"(redis://USER:PASSWORD@host:port/db)")
    who = login(env.redis_url.reveal())
    if who.default:
        raise ConfigError(f"{env.name}'s REDIS_URL logs in as the default user; name a user of its own "
                          f"(redis://USER:PASSWORD@host:port/db) for grant to limit to {env.redis_prefix}*")
    if not who.password and not revoke:
        raise ConfigError(f"{env.name}'s REDIS_URL has no password for user {who.user!r}; "
                          "add one (redis://USER:PASSWORD@host:port/db)")
    secrets = [*env.secrets(), *secret_parts(admin_url)]
    admin = login(admin_url)
    if admin.user == who.user:
        raise RefusedError(f"the administrative URL logs in as {who.user!r}, the user grant would change; "
                           "use an administrator of its own")
    client = _client(admin_url, secrets)
    try:
        current = client.acl_getuser(who.user)
        if current is not None:
            _refuse_foreign(env, who.user, current)
        if revoke:
            if current is None:
                return [f"redis {env.name}: user {who.user} does not exist; nothing to revoke"]
            client.acl_deluser(who.user)
            return [f"redis {env.name}: deleted user {who.user}"] + _persist(client, env)
        client.execute_command(*setuser_args(who.user, who.password or "", env.redis_prefix))
        verb = "updated" if current is not None else "created"
        return [f"redis {env.name}: {verb} user {who.user}: keys {env.redis_prefix}*, channels "
                f"{env.redis_prefix}*, commands {' '.join(RULES)}"] + _persist(client, env)
    except redis.RedisError as exc:
        raise RefusedError(f"redis: the administrative URL {_masked(admin_url)} refused the ACL change "
                           f"({scrub(str(exc), secrets)}); it needs a user allowed to run ACL") from None
    finally:
        client.close()


def _client(url: str, secrets: list[Any]) -> Any:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S)
        client.ping()
    except ValueError as exc:
        raise ConfigError(f"redis: the administrative URL {_masked(url)} is invalid: "
                          f"{scrub(str(exc), secrets)}") from None
    except redis.AuthenticationError as exc:
        raise RefusedError(f"redis: the administrative URL {_masked(url)} could not log in: "
                           f"{scrub(str(exc), secrets)}") from None
    except redis.RedisError as exc:
        raise UnreachableError(f"redis: cannot reach {_masked(url)} within {TIMEOUT_S}s: "
                               f"{scrub(str(exc), secrets) or type(exc).__name__}") from None
    return client


def _masked(url: str) -> str:
    from ..environments import mask_url

    return mask_url(url)


def _refuse_foreign(env: Environment, user: str, current: dict[str, Any]) -> None:
    """An existing user with keys outside this prefix may be another environment's: never take it over."""
    mine = f"~{env.redis_prefix}*"
    foreign = [k for k in _patterns(current.get("keys")) if k != mine]
    if foreign:
        raise RefusedError(f"redis user {user!r} already has keys {' '.join(foreign)}, not {env.name}'s "
                           f"{env.redis_prefix}* alone; it may be another environment's or an administrator's "
                           f"login: give {env.name} a user of its own in REDIS_URL")


def _patterns(value: Any) -> list[str]:
    """ACL GETUSER's key patterns, as a list of strings (Redis 7 answers a list, older ones one string)."""
    items = value if isinstance(value, list) else [value] if value else []
    return [p for item in items for p in (item.decode() if isinstance(item, bytes) else str(item)).split()]


def _persist(client: Any, env: Environment) -> list[str]:
    """Save the ACL when the server keeps an ACL file; otherwise say the change lasts until a restart."""
    import redis

    try:
        client.execute_command("ACL", "SAVE")
    except redis.ResponseError:
        return [f"redis {env.name}: the server has no ACL file, so this lasts until it restarts; set aclfile in "
                "redis.conf (then ACL SAVE) or CONFIG REWRITE to keep it"]
    return [f"redis {env.name}: ACL saved to the server's ACL file"]


# --- verify ------------------------------------------------------------------------------------


def check(result: Any, env: Environment, others: list[Environment]) -> None:
    """As REDIS_URL's user: its own prefix works, other environments' prefixes and dangerous commands
    are refused (NOPERM). Probes never create a key outside the environment's own prefix."""
    import redis

    from ..verify import NOT_CHECKABLE

    if env.redis_url is None:
        return
    who = login(env.redis_url.reveal())
    name = f"login {who.user} is limited to {env.redis_prefix}*"
    if who.default:
        result.add(STORE, name, status=NOT_CHECKABLE,
                   detail=f"REDIS_URL logs in as the default user, which no ACL limits; name a user of "
                          f"{env.name}'s own in REDIS_URL, then run momentry-db grant --env {env.name} --store redis")
        return
    secrets = env.secrets()
    try:
        client = redis.Redis.from_url(env.redis_url.reveal(), socket_connect_timeout=TIMEOUT_S,
                                      socket_timeout=TIMEOUT_S)
        try:
            problems = _probe(client, env, others, who.user)
        finally:
            client.close()
    except redis.AuthenticationError as exc:
        result.add(STORE, name, [f"cannot log in as {who.user}: {scrub(str(exc), secrets)}; run momentry-db "
                                 f"grant --env {env.name} --store redis"])
        return
    except redis.RedisError as exc:
        result.add(STORE, name, [f"{type(exc).__name__}: {scrub(str(exc), secrets)}"])
        return
    result.add(STORE, name, problems,
               ok_detail=f"own prefix read and written; refused: {', '.join(f'{o.name} {o.redis_prefix}*' for o in others)}"
                         f"{', ' if others else ''}CONFIG")


def _probe(client: Any, env: Environment, others: list[Environment], user: str) -> list[str]:
    import redis

    problems: list[str] = []
    key = f"{env.redis_prefix}{PROBE}{uuid.uuid4().hex}"
    try:
        client.set(key, "1", px=60_000)  # expires on its own should the DEL below never run
        if client.get(key) != b"1":
            problems.append(f"{user} wrote {key} but read back something else")
        client.delete(key)
    except redis.exceptions.NoPermissionError as exc:
        problems.append(f"{user} may not use its own prefix {env.redis_prefix}: {exc}")
    for other in others:
        # A key that does not exist: GET reads nothing and DEL deletes nothing even where allowed.
        theirs = f"{other.redis_prefix}{PROBE}{uuid.uuid4().hex}"
        for verb, attempt in (("read", lambda k=theirs: client.get(k)), ("write", lambda k=theirs: client.delete(k))):
            try:
                attempt()
            except redis.exceptions.NoPermissionError:
                continue
            problems.append(f"{user} may {verb} {other.name}'s keys {other.redis_prefix}* (no NOPERM)")
    try:
        client.config_get("maxmemory")
        problems.append(f"{user} may run CONFIG (a dangerous command)")
    except redis.exceptions.NoPermissionError:
        pass
    return problems

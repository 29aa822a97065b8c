"""Environment values, the registry of known environments, and name validation.

Pure logic: nothing here reads the process environment or touches a store.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import ConfigError

PRIMARY = "prod"
PRIMARY_SCHEMA = "public"
NAME_ROOT = "momentry"
QDRANT_LOGICAL_COLLECTION = "rule1"

_ENV_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
_PG_IDENT = re.compile(r"[a-z_][a-z0-9_]*")
_MONGO_DB = re.compile(r"[a-z_][a-z0-9_]*")
_QDRANT_COLLECTION = re.compile(r"[a-z_][a-z0-9_-]*")
_REDIS_PREFIX = re.compile(r"[a-z_][a-z0-9_.:-]*:")
_RESERVED_SCHEMAS = {"information_schema"}
_RESERVED_MONGO = {"admin", "local", "config"}


def _shown(value: str) -> str:
    """Quote a user-supplied value for an error line, control characters escaped."""
    return repr(value)


_PG_DURATION = re.compile(r"\d+(ms|s|min|h)?")


def validate_pg_duration(value: str, what: str) -> str:
    """Check a PostgreSQL duration for lock_timeout / statement_timeout, such as 5s or 500ms."""
    if not _PG_DURATION.fullmatch(value):
        raise ConfigError(f"{what} {_shown(value)} is not a duration: use a number with ms, s, min or h (0 = none)")
    return value


def validate_env_name(name: str) -> str:
    """Check an environment name such as ``dev``, ``staging`` or ``pr-42``."""
    if not _ENV_NAME.fullmatch(name) or len(name) > 40:
        raise ConfigError(
            f"invalid environment name {_shown(name)}: use lowercase letters, digits, '-' or '_' "
            "(at most 40 characters, starting with a letter)"
        )
    return name


def validate_schema(schema: str, *, primary: bool) -> str:
    """Check a PostgreSQL schema name; non-primary environments may not use public or pg_*."""
    if not _PG_IDENT.fullmatch(schema):
        raise ConfigError(
            f"invalid schema name {_shown(schema)}: a schema is [a-z_][a-z0-9_]* (lowercase, unquoted)"
        )
    if len(schema.encode()) > 63:
        raise ConfigError(f"invalid schema name {_shown(schema)}: longer than PostgreSQL's 63 bytes")
    if primary:
        if schema != PRIMARY_SCHEMA:
            raise ConfigError(
                f"prod's schema must be {PRIMARY_SCHEMA!r}, not {schema!r}: "
                "unset DATABASE_SCHEMA or set it to public for prod"
            )
        return schema
    if schema == PRIMARY_SCHEMA:
        raise ConfigError("schema 'public' belongs to prod: another environment may not use it")
    if schema.startswith("pg_") or schema in _RESERVED_SCHEMAS:
        raise ConfigError(f"schema {schema!r} is reserved by PostgreSQL")
    return schema


_RESERVED_ROLES = {"public", "none", "current_user", "session_user", "current_role"}


def validate_role(role: str, what: str = "role") -> str:
    """Check a PostgreSQL role or login name: [a-z_][a-z0-9_]*, at most 63 bytes, not pg_* or reserved."""
    if not _PG_IDENT.fullmatch(role):
        raise ConfigError(f"invalid {what} name {_shown(role)}: a PostgreSQL {what} is [a-z_][a-z0-9_]* "
                          "(lowercase, unquoted)")
    if len(role.encode()) > 63:
        raise ConfigError(f"invalid {what} name {_shown(role)}: longer than PostgreSQL's 63 bytes")
    if role.startswith("pg_") or role in _RESERVED_ROLES:
        raise ConfigError(f"{what} name {role!r} is reserved by PostgreSQL")
    return role


def validate_mongo_database(database: str) -> str:
    """Check a MongoDB database name."""
    if not _MONGO_DB.fullmatch(database) or len(database.encode()) > 63:
        raise ConfigError(
            f"invalid MongoDB database name {_shown(database)}: use [a-z_][a-z0-9_]*, at most 63 bytes"
        )
    if database in _RESERVED_MONGO:
        raise ConfigError(f"MongoDB database {database!r} is reserved by MongoDB")
    return database


def validate_collection(collection: str) -> str:
    """Check a Qdrant collection name."""
    if not _QDRANT_COLLECTION.fullmatch(collection) or len(collection) > 255:
        raise ConfigError(
            f"invalid Qdrant collection name {_shown(collection)}: use [a-z_][a-z0-9_-]*"
        )
    return collection


def validate_redis_prefix(prefix: str) -> str:
    """Check a Redis key prefix such as ``momentry_dev:`` (no glob characters)."""
    if not _REDIS_PREFIX.fullmatch(prefix) or len(prefix) > 128:
        raise ConfigError(
            f"invalid Redis prefix {_shown(prefix)}: use [a-z_][a-z0-9_.:-]* ending in ':'"
        )
    return prefix


@dataclass(frozen=True)
class EnvSpec:
    """A known environment before settings are applied: its name and declared names."""

    name: str
    schema: str | None = None
    database: str | None = None
    collection: str | None = None
    prefix: str | None = None
    env_file: str | None = None
    port: int | None = None
    role: str | None = None
    source: str = "built in"

    @property
    def primary(self) -> bool:
        return self.name == PRIMARY

    @property
    def slug(self) -> str:
        """The name as it appears inside store names: ``pr-42`` becomes ``pr_42``."""
        return self.name.replace("-", "_")

    @property
    def root(self) -> str:
        """The stem of this environment's store names: ``momentry``, ``momentry_dev``."""
        return NAME_ROOT if self.primary else f"{NAME_ROOT}_{self.slug}"

    def default_env_file(self) -> str:
        if self.env_file:
            return self.env_file
        return ".env" if self.primary else (".env.development" if self.name == "dev" else f".env.{self.name}")

    def default_schema(self) -> str:
        return self.schema or (PRIMARY_SCHEMA if self.primary else self.slug)

    def default_database(self) -> str:
        return self.database or self.root

    def default_collection(self) -> str:
        return self.collection or f"{self.root}_{QDRANT_LOGICAL_COLLECTION}"

    def default_prefix(self) -> str:
        return self.prefix or f"{self.root}:"

    def default_role(self) -> str:
        """The environment's PostgreSQL group role: ``momentry_app``, ``momentry_dev_app``."""
        return self.role or f"{self.root}_app"

    def default_port(self) -> int | None:
        if self.port is not None:
            return self.port
        return {"prod": 3002, "dev": 3003}.get(self.name)


BUILT_IN = (EnvSpec(PRIMARY), EnvSpec("dev"))


@dataclass(frozen=True)
class Registry:
    """Every known environment, prod first, in declaration order."""

    specs: tuple[EnvSpec, ...] = BUILT_IN

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def get(self, name: str) -> EnvSpec:
        """Return the spec of a known environment; an unknown name lists the known ones."""
        for spec in self.specs:
            if spec.name == name:
                return spec
        raise ConfigError(
            f"unknown environment {_shown(name)}; known: {', '.join(self.names)} "
            "(declare more in momentry-db.toml [environments] or MOMENTRY_EXTRA_ENVS)"
        )

    def by_schema(self, schema: str) -> EnvSpec:
        """Return the environment whose default schema is ``schema``."""
        for spec in self.specs:
            if spec.default_schema() == schema:
                return spec
        known = ", ".join(f"{s.default_schema()} ({s.name})" for s in self.specs)
        raise ConfigError(f"schema {schema!r} belongs to no configured environment; known: {known}")

    def with_declared(self, declared: list[EnvSpec]) -> Registry:
        """Add declared environments; a declaration of a known name replaces its spec."""
        specs = {s.name: s for s in self.specs}
        for spec in declared:
            only_role = EnvSpec(spec.name, role=spec.role, source=spec.source)
            if spec.primary and (spec.role is None or spec != only_role):
                raise ConfigError(f"{spec.source}: prod is built in and cannot be redeclared "
                                  "(only its role may be set)")
            specs[spec.name] = spec
        registry = Registry(tuple(specs.values()))
        registry.check_distinct()
        return registry

    def check_distinct(self) -> None:
        """Refuse two environments whose schema, database, collection, prefix or env file overlap."""
        for label, value_of in NAME_KINDS:
            index = self.index(label)
            for i, spec in enumerate(self.specs):
                earlier = [j for j in index.clashing(value_of(spec)) if j < i]
                if earlier:
                    other = self.specs[min(earlier)]
                    raise ConfigError(f"environments {other.name} and {spec.name} would share the "
                                      f"{label} {value_of(other)!r} / {value_of(spec)!r}")

    def index(self, label: str) -> NameIndex:
        """Every environment's default name for one store (a ``NAME_KINDS`` label), indexed."""
        cache = self.__dict__.setdefault("_names", {})  # frozen: a cache outside the fields
        if label not in cache:
            value_of = dict(NAME_KINDS)[label]
            cache[label] = NameIndex(label, [value_of(s) for s in self.specs])
        return cache[label]


#: Each store's name for an environment, as the registry checks them for overlap.
NAME_KINDS = (
    ("schema", EnvSpec.default_schema),
    ("MongoDB database", EnvSpec.default_database),
    ("Qdrant collection", EnvSpec.default_collection),
    ("Redis prefix", EnvSpec.default_prefix),
    ("env file", EnvSpec.default_env_file),
    ("PostgreSQL role", EnvSpec.default_role),
)


class NameIndex:
    """Many environments' names for one store, looked up for clashes (``names_clash``) without
    comparing every pair: a run over hundreds of environments checks each name once."""

    def __init__(self, label: str, values: list[str]) -> None:
        self.label, self.values = label, values
        self.exact: dict[object, list[int]] = {}
        for i, value in enumerate(values):
            self.exact.setdefault(self._key(value), []).append(i)
        self.ordered = sorted((v, i) for i, v in enumerate(values))

    def _key(self, value: str) -> object:
        return Path(value) if self.label == "env file" else value

    def clashing(self, value: str) -> list[int]:
        """The positions of every name that clashes with ``value``, in order."""
        candidates = set(self.exact.get(self._key(value), ()))
        starts: list[str] = []  # names that start with one of these clash
        if self.label == "Redis prefix":
            candidates.update(i for k in range(len(value)) for i in self.exact.get(value[:k], ()))
            starts.append(value)
        elif self.label == "Qdrant collection":
            candidates.update(i for k in range(len(value)) if value.startswith("__", k)
                              for i in self.exact.get(value[:k], ()))
            starts.append(value + "__")
        for start in starts:
            from bisect import bisect_left

            at = bisect_left(self.ordered, (start, -1))
            while at < len(self.ordered) and self.ordered[at][0].startswith(start):
                candidates.add(self.ordered[at][1])
                at += 1
        return sorted(i for i in candidates if names_clash(self.label, value, self.values[i]))


def names_clash(label: str, mine: str, theirs: str) -> bool:
    """Whether two environments' names for one store would reach the same data.

    Qdrant collections clash when one is the other's physical ``<alias>__...``
    collection; Redis prefixes clash when one is a prefix of the other.
    """
    if label == "Qdrant collection":
        return mine == theirs or mine.startswith(theirs + "__") or theirs.startswith(mine + "__")
    if label == "Redis prefix":
        return mine.startswith(theirs) or theirs.startswith(mine)
    if label == "env file":
        return Path(mine) == Path(theirs)
    return mine == theirs


@dataclass(frozen=True)
class Secret:
    """A secret value whose repr and str never show it."""

    value: str = field(repr=False)

    def __str__(self) -> str:
        return self.masked

    @property
    def masked(self) -> str:
        return "***"

    def reveal(self) -> str:
        return self.value


@dataclass(frozen=True)
class SecretURL(Secret):
    """A connection URL (or libpq key/value DSN) whose password is masked wherever it is shown."""

    @property
    def masked(self) -> str:
        return mask_url(self.value)

    @property
    def password(self) -> str | None:
        parts = secret_parts(self.value)
        return parts[0] if parts else None


# A parameter that holds a secret: its name ends in password, passwd, secret, token or key, in any
# case (sslpassword, ssl_password, tlsCertificateKeyFilePassword, api_key, apikey, access_token).
_SECRET_NAME = r"[\w.-]*?(?:password|passwd|secret|token|key)"
# A URL parameter: in a whole URL the value runs to '&' or '#'; in free text also to whitespace,
# or to the quote that closes the string the URL is shown in ("...password=x", or '...' in a repr),
# a quote followed by whitespace, the end or a closing mark, which stays.
_TEXT_END = r"(?![\"'](?:[\s,:;)\]}]|$))"
_QUERY_SECRET = re.compile(rf"([?&]{_SECRET_NAME}=)([^&#]*)", re.IGNORECASE)
_QUERY_SECRET_IN_TEXT = re.compile(rf"([?&]{_SECRET_NAME}=)((?:{_TEXT_END}[^&#\s])*)", re.IGNORECASE)
# A NAME:VALUE pair inside a parameter's value, as in authMechanismProperties=AWS_SESSION_TOKEN:...,
# the ':' possibly percent-encoded; the value runs to the next ','.
_PAIR_SECRET = re.compile(rf"((?:(?<=[=,])|(?<=%2[cC])){_SECRET_NAME}(?::|%3[aA]))([^,&#]*)", re.IGNORECASE)
_PAIR_SECRET_IN_TEXT = re.compile(
    rf"((?:(?<=[=,])|(?<=%2[cC])){_SECRET_NAME}(?::|%3[aA]))((?:{_TEXT_END}[^,&#\s])*)", re.IGNORECASE)
# A libpq key/value setting: 'quoted, with \' and \\ escapes' or unquoted up to whitespace;
# in both a backslash escapes the next character, a newline included.
_DSN_SECRET = re.compile(rf"((?<![?&\w.-]){_SECRET_NAME}\s*=\s*)('(?:\\.|[^'\\])*'?|(?:\\.|[^\s\\])*\\?)",
                         re.IGNORECASE | re.DOTALL)
# In a message the DSN may be shown through repr(), which doubles each backslash.
_DSN_SECRET_IN_TEXT = re.compile(
    rf"((?<![?&\w.-]){_SECRET_NAME}\s*=\s*)('(?:\\+.|[^'\\])*'?|(?:\\+.|[^\s\\'\"])+)",
    re.IGNORECASE | re.DOTALL)
# Where a URL parser may end a piece of the user info: the URL delimiters, whitespace, and the
# backslash, which urllib3 (Qdrant's client) and WHATWG parsers treat as a '/'.
_PIECE_DELIMITERS = re.compile(r"[/@:?#\s\\]+")
# The libpq settings that hold a secret.
_LIBPQ_SECRETS = ("password", "sslpassword")
# A URL's scheme and the slashes after it ('rediss:://' too: a stray ':' must not hide a password).
_SCHEME = re.compile(r"\s*[a-zA-Z][a-zA-Z0-9+.-]*::*//+")
# A setting written without a scheme, user:password@host: a user with no '=' or space (which would
# make it a libpq key/value DSN) then ':'.
_NO_SCHEME = re.compile(r"\s*[^\s=:]*:")
# A URL inside a message: scheme, then user info up to the last '@' before whitespace.
_USERINFO_IN_TEXT = re.compile(r"(?<![\w+.-])([a-zA-Z][a-zA-Z0-9+.-]*::*/+)(\S*)@")
_MIN_REPLACED = 4  # shorter secrets are masked by structure only, never replaced everywhere


def _split_url(url: str) -> tuple[str, str, str] | None:
    """Split a URL into (scheme and slashes, user info, rest from the '@'), by the last '@'.
    A setting written ``user:password@host``, with no scheme, splits with an empty scheme.

    The user info runs to the last '@', so a password holding an unencoded '/', '@',
    ':', '?', '#' or a space is never mistaken for a host, path or query.
    """
    scheme = _SCHEME.match(url)
    if scheme is not None:
        head = url[:scheme.end()]
    elif _NO_SCHEME.match(url):  # user:password@host with no scheme: the user info is all before the '@'
        head = url[:len(url) - len(url.lstrip())]
    else:
        return None
    rest = url[len(head):]
    at = rest.rfind("@")
    if at < 0:
        return None
    return head, rest[:at], rest[at:]


def _masked_userinfo(info: str) -> str:
    user, colon, _ = info.partition(":")
    if colon:
        return f"{user}:***" if not re.search(r"[/?#@\s]", user) else "***"
    return info if not re.search(r"[/?#@\s]", info) else "***"


def _unquote_dsn(value: str) -> str:
    """A libpq value as libpq reads it (conninfo_parse): in a quoted value a backslash escapes the
    next character and the first unescaped quote ends it; unquoted, a backslash escapes the next
    character and a trailing lone backslash is dropped."""
    quoted = value.startswith("'")
    out: list[str] = []
    i = 1 if quoted else 0
    while i < len(value):
        char = value[i]
        if char == "\\":
            if i + 1 < len(value):
                out.append(value[i + 1])
            i += 2
            continue
        if quoted and char == "'":
            break
        out.append(char)
        i += 1
    return "".join(out)


def _libpq_secrets(value: str) -> list[str] | None:
    """The secret settings of a DSN as libpq itself reads them, or None if libpq refuses the string."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(value)
    except Exception:  # not a DSN libpq accepts (an unknown option, an unterminated quote): parse by hand
        return None
    return [str(params[key]) for key in _LIBPQ_SECRETS if params.get(key)]


def secret_parts(value: str) -> list[str]:
    """The secrets inside a connection string: the user-info password, password parameters, DSN passwords."""
    found: list[str] = []
    split = _split_url(value)
    if split is not None:
        _, colon, password = split[1].partition(":")
        if colon and password:
            found.append(password)
        elif not colon and re.search(r"[/?#@\s]", split[1]):
            found.append(split[1])
        found += _parameter_secrets(split[2])
    else:
        found += _libpq_secrets(value) or []
        found += _parameter_secrets(value)
        found += [_unquote_dsn(m.group(2)) for m in _DSN_SECRET.finditer(value) if m.group(2)]
        found += [m.group(2) for m in _DSN_SECRET.finditer(value) if m.group(2)]
    return [f for f in dict.fromkeys(found) if f]


def _parameter_secrets(query: str) -> list[str]:
    """The values of secret parameters, and of secret NAME:VALUE pairs inside a parameter's value."""
    return [m.group(2) for pattern in (_QUERY_SECRET, _PAIR_SECRET) for m in pattern.finditer(query) if m.group(2)]


def _mask_parameters(query: str) -> str:
    for pattern in (_QUERY_SECRET, _PAIR_SECRET):
        query = pattern.sub(lambda m: m.group(1) + "***", query)
    return query


def secret_variants(secret: str) -> list[str]:
    """A secret as it may appear in output: as given, percent-decoded, escaped for JSON or repr,
    and the pieces a parser may cut it into at URL delimiters, backslashes or spaces."""
    import json
    from urllib.parse import unquote

    forms = [secret, unquote(secret), json.dumps(secret)[1:-1], repr(secret)[1:-1]]
    for form in list(forms):
        forms += _PIECE_DELIMITERS.split(form)
    return [f for f in dict.fromkeys(forms) if len(f) >= _MIN_REPLACED]


def mask_url(url: str) -> str:
    """Mask a connection string's secrets, from the raw text: the password in the user info
    (everything from the first ':' to the last '@', with or without a scheme), parameters whose
    name ends in password, passwd, secret, token or key (and such NAME:VALUE pairs inside a
    parameter's value), and DSN settings.

    The user info runs to the last '@' even where a driver would read it shorter (see
    ``userinfo_end``): masking hides the password under every reading of the text.
    """
    split = _split_url(url)
    if split is not None:
        head, info, rest = split
        return head + _masked_userinfo(info) + _mask_parameters(rest)
    return _DSN_SECRET.sub(lambda m: m.group(1) + "***", _mask_parameters(url))


def userinfo_end(rest: str) -> int:
    """Where a URL's user info ends as a driver is to read it: the index in ``rest`` (the URL after
    ``scheme://``) of the '@' that ends it, or -1 if it has none.

    The standard reading ends the authority at the first '/', '?' or '#', but a pasted password may
    hold those and '@' unencoded. The reading kept is the first in which what follows the '@' reads
    as a location: hosts with numeric ports, then a path and fragment with no '@', then a query of
    name=value pairs. So ``u:S3c/re@t@db/m`` reaches host db with password ``S3c/re@t``,
    ``u:a@evil:5432/x@db/m`` reaches db, and ``u:pw@db/m?application_name=me@x`` keeps host db.
    Where no reading fits, the last '@'.
    """
    if "@" not in rest:
        return -1
    for at in [-1, *(i for i, char in enumerate(rest) if char == "@")]:
        if _reads_as_location(rest[at + 1:]):
            return at
    return rest.rfind("@")


def _reads_as_location(text: str) -> bool:
    from urllib.parse import parse_qsl, urlsplit

    location, _, fragment = text.partition("#")
    location, _, query = location.partition("?")
    authority = location.partition("/")[0]
    if "@" in location or "@" in fragment:
        return False
    for host in authority.split(","):
        try:
            urlsplit(f"//{host}").port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            return False
    try:
        parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Environment:
    """One environment, fully resolved: its store names and connection settings."""

    name: str
    primary: bool
    root: str  # stem of derived store names: momentry, momentry_dev, momentry_pr_42
    schema: str
    mongo_database: str
    qdrant_collection: str
    redis_prefix: str
    output_dir: Path
    backup_dir: Path
    server_port: int | None
    worker_enabled: bool
    env_file: Path | None
    state_dir: Path
    embedded: bool = True  # a store with no URL uses its embedded server (MOMENTRY_EMBEDDED)
    pg_lock_timeout: str = "5s"
    pg_statement_timeout: str = "30min"
    pg_role: str = ""  # the environment's NOLOGIN group role (momentry_dev_app)
    pg_grants: bool = True  # momentry-db manages the role and its grants (MOMENTRY_PG_GRANTS)
    database_url: SecretURL | None = None
    mongodb_url: SecretURL | None = None
    qdrant_url: SecretURL | None = None
    qdrant_api_key: Secret | None = None
    redis_url: SecretURL | None = None

    def qdrant_collection_for(self, logical: str) -> str:
        """The physical collection name of a logical spec (``rule1`` -> ``momentry_dev_rule1``)."""
        if logical == QDRANT_LOGICAL_COLLECTION:
            return self.qdrant_collection
        return f"{self.root}_{logical}"

    def secrets(self) -> list[str | SecretURL]:
        """Every secret this environment holds, for scrubbing output: each password and API key,
        and each connection string that holds one (shown masked, not removed)."""
        found: list[str | SecretURL] = []
        for item in (self.database_url, self.mongodb_url, self.qdrant_url, self.redis_url):
            if item is not None and secret_parts(item.value):
                found += [*secret_parts(item.value), item]
        if self.qdrant_api_key is not None and self.qdrant_api_key.value:
            found.append(self.qdrant_api_key.value)
        return found


def scrub(text: str, secrets: Iterable[str | Secret]) -> str:
    """Remove every known secret, and any URL or DSN password, from a message.

    A known connection string is replaced by its masked form; any other known secret,
    and the forms and pieces it may be printed as, by ``***``. Then passwords are masked
    by structure, so one that was never known, or too short to replace, is hidden too.
    """
    replacements: dict[str, str] = {}
    for secret in secrets:
        if isinstance(secret, Secret):
            for raw in _url_forms(secret.value):
                replacements.setdefault(raw, mask_url(raw) if isinstance(secret, SecretURL) else "***")
            continue
        for variant in secret_variants(secret):
            replacements.setdefault(variant, "***")
    for secret in sorted(replacements, key=len, reverse=True):
        if len(secret) >= _MIN_REPLACED:
            text = _whole(secret).sub(lambda _, r=replacements[secret]: r, text)
    text = _USERINFO_IN_TEXT.sub(lambda m: m.group(1) + _masked_userinfo(m.group(2)) + "@", text)
    text = _QUERY_SECRET_IN_TEXT.sub(lambda m: m.group(1) + "***", text)
    text = _PAIR_SECRET_IN_TEXT.sub(lambda m: m.group(1) + "***", text)
    return _DSN_SECRET_IN_TEXT.sub(lambda m: m.group(1) + "***", text)


_PG_SCHEMES = ("postgresql+psycopg://", "postgresql://", "postgres://")


@lru_cache(maxsize=256)
def _whole(secret: str) -> re.Pattern[str]:
    """The secret where it stands alone: a piece "rant" is hidden in "Q/d:rant@", not in "qdrant"."""
    before = "(?<![A-Za-z0-9])" if secret[0].isalnum() else ""
    after = "(?![A-Za-z0-9])" if secret[-1].isalnum() else ""
    return re.compile(before + re.escape(secret) + after)


def _url_forms(url: str) -> list[str]:
    """A URL as given and, for PostgreSQL, under each scheme it may be written or passed with."""
    for scheme in _PG_SCHEMES:
        if url.startswith(scheme):
            return [other + url[len(scheme):] for other in _PG_SCHEMES]
    return [url]

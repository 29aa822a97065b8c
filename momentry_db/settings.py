"""The only reader of the process environment, env files and momentry-db.toml.

Precedence, highest first: explicit overrides (command-line options), the process
environment, the environment's env file, the built-in default.
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .environments import (
    Environment,
    EnvSpec,
    Registry,
    Secret,
    SecretURL,
    secret_parts,
    validate_collection,
    validate_env_name,
    validate_mongo_database,
    validate_pg_duration,
    validate_redis_prefix,
    validate_role,
    validate_schema,
)
from .errors import ConfigError

CONFIG_FILE = "momentry-db.toml"
_SPEC_KEYS = {"schema": str, "database": str, "collection": str, "prefix": str, "env_file": str, "port": int,
              "role": str}
_PG_SCHEMES = ("postgres://", "postgresql://", "postgresql+psycopg://")


@dataclass(frozen=True)
class Project:
    """Project-wide settings: where files live and which environments exist."""

    root: Path
    state_dir: Path
    registry: Registry
    environ: Mapping[str, str]
    alembic_scripts: Path | None = None  # from the project's alembic.ini, when it has one
    embedded: bool = True  # MOMENTRY_EMBEDDED: start embedded servers for stores with no URL

    def environment(
        self,
        name: str,
        *,
        env_file: Path | None = None,
        overrides: Mapping[str, str | None] | None = None,
        one_of_many: bool = False,
    ) -> Environment:
        """Resolve one environment by name into a frozen, validated Environment.

        With ``one_of_many`` (verify's other environments, --all, envs), names set in the
        process environment (DATABASE_SCHEMA and the like) are not applied: they describe
        the one environment a shell was set up for, not every environment at once.
        """
        return _resolve(self, self.registry.get(name), env_file, overrides or {}, one_of_many)

    def environments(self) -> list[Environment]:
        """Resolve every configured environment, prod first."""
        return [self.environment(name, one_of_many=True) for name in self.registry.names]

    def secrets(self, env_files: Iterable[Path] = ()) -> list[str | Secret]:
        """Every secret set for any environment (or in ``env_files``), read as given, unvalidated,
        for scrubbing output: a value that fails validation must not show in its error either."""
        found: list[str | Secret] = []
        for path in [*(self.root / spec.default_env_file() for spec in self.registry.specs), *env_files]:
            try:
                file_values = _read_env_file(path) if path.is_file() else {}
            except ConfigError:
                file_values = {}
            for key in SECRET_VARS:
                for value in {self.environ.get(key), file_values.get(key)} - {None, ""}:
                    found += secret_values(key, value)  # type: ignore[arg-type]
        return list(dict.fromkeys(found))

    def admin_url(self, store: str, given: str | None = None) -> str:
        """The administrative URL grant connects with: the one given, else MOMENTRY_<STORE>_ADMIN_URL."""
        variable = ADMIN_URL_VARS[store]
        url = given or self.environ.get(variable)
        if not url:
            raise ConfigError(f"grant --store {store} needs an administrative URL: pass --admin-url URL "
                              f"or set {variable}")
        return url

    def process_isolation_vars(self) -> list[str]:
        """Isolation names set in the process environment, which multi-environment commands ignore."""
        return [k for k in ISOLATION_VARS if self.environ.get(k)]


def load_project(root: Path | None = None, environ: Mapping[str, str] | None = None) -> Project:
    """Read momentry-db.toml and MOMENTRY_EXTRA_ENVS into the project's registry."""
    environ = os.environ if environ is None else environ
    root = Path(root or environ.get("MOMENTRY_PROJECT_DIR") or Path.cwd()).resolve()
    if not root.is_dir():
        raise ConfigError(f"project directory {str(root)!r} does not exist")
    declared = _declared_in_file(root / CONFIG_FILE)
    known = {"prod", "dev", *(s.name for s in declared)}
    for raw in environ.get("MOMENTRY_EXTRA_ENVS", "").split(","):
        name = raw.strip()
        if name and name not in known:
            try:
                validate_env_name(name)
            except ConfigError as exc:
                raise ConfigError(f"MOMENTRY_EXTRA_ENVS: {exc}") from None
            declared.append(EnvSpec(name, source="MOMENTRY_EXTRA_ENVS"))
            known.add(name)
    state_dir = Path(environ.get("MOMENTRY_STATE_DIR") or root / ".momentry")
    if not state_dir.is_absolute():
        state_dir = root / state_dir
    registry = Registry().with_declared(declared)
    _refuse_shared_env_files(root, registry)
    return Project(root=root, state_dir=state_dir, registry=registry,
                   environ=environ, alembic_scripts=_script_location(root / "alembic.ini"),
                   embedded=_embedded_switch(environ.get("MOMENTRY_EMBEDDED")))


def _embedded_switch(value: str | None) -> bool:
    """MOMENTRY_EMBEDDED: on (the default) or off."""
    text = (value or "on").strip().lower()
    if text not in {"on", "off"}:
        raise ConfigError(f"MOMENTRY_EMBEDDED must be on or off, not {value!r}; off disables the embedded "
                          "PostgreSQL and MongoDB servers")
    return text == "on"


def _switch(variable: str, value: str | None, off_means: str) -> bool:
    """An on/off setting (on by default)."""
    text = (value or "on").strip().lower()
    if text not in {"on", "off"}:
        raise ConfigError(f"{variable} must be on or off, not {value!r}; {off_means}")
    return text == "on"


def _script_location(ini: Path) -> Path | None:
    """The migrations folder an alembic.ini names, so momentry-db and alembic run the same revisions."""
    import configparser

    if not ini.is_file():
        return None
    parser = configparser.ConfigParser(defaults={"here": str(ini.parent)})
    try:
        parser.read(ini)
        location = parser.get("alembic", "script_location", fallback=None)
    except configparser.Error as exc:
        raise ConfigError(f"{ini.name}: cannot be read ({exc})") from None
    if not location:
        return None
    path = Path(location)
    return path if path.is_absolute() else ini.parent / path


def _declared_in_file(path: Path) -> list[EnvSpec]:
    if not path.is_file():
        return []
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path.name}: not valid TOML ({exc})") from None
    table = data.get("environments", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path.name}: [environments] must be a table")
    specs = []
    for name, body in table.items():
        where = f"{path.name} [environments.{name}]"
        try:
            validate_env_name(name)
        except ConfigError as exc:
            raise ConfigError(f"{path.name} [environments]: {exc}") from None
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: must be a table, for example {name} = {{}}")
        for key, value in body.items():
            if key not in _SPEC_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r}; known: {', '.join(_SPEC_KEYS)}")
            if not isinstance(value, _SPEC_KEYS[key]) or isinstance(value, bool):
                raise ConfigError(f"{where}: {key} must be a {_SPEC_KEYS[key].__name__}")
        spec = EnvSpec(name, source=where, **body)
        if spec.role is not None:
            try:
                validate_role(spec.role)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        if spec.schema is not None:
            try:
                validate_schema(spec.schema, primary=spec.primary)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        specs.append(spec)
    return specs


def _read_env_file(path: Path) -> dict[str, str]:
    return read_env_file(path)


def read_env_file(path: Path) -> dict[str, str]:
    """Read an env file; a line python-dotenv cannot parse is an error naming the file and line."""
    import io

    from dotenv import dotenv_values
    from dotenv.parser import parse_stream

    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"env file {str(path)!r} cannot be read: {exc}") from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            raise ConfigError(f"env file {str(path)!r}, line {binding.original.line}: cannot be parsed; "
                              "write KEY=value, quoting values with spaces or '#' and closing every quote")
    return {k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None}


ISOLATION_VARS = ("DATABASE_SCHEMA", "MONGODB_DATABASE", "QDRANT_COLLECTION", "MOMENTRY_REDIS_PREFIX",
                  "MOMENTRY_OUTPUT_DIR", "MOMENTRY_BACKUP_DIR", "MOMENTRY_SERVER_PORT", "MOMENTRY_WORKER_ENABLED")


def refuse_foreign_env_file(project: Project, spec: EnvSpec, path: Path, what: str) -> None:
    """Refuse a file that is another environment's env file, compared as resolved paths (symlinks too)."""
    mine = Path(path).resolve()
    for other in project.registry.specs:
        if other.name != spec.name and (project.root / other.default_env_file()).resolve() == mine:
            raise ConfigError(f"{what} {str(path)!r} is environment {other.name}'s env file; "
                              f"give {spec.name} its own file (such as {spec.default_env_file()})")


def _refuse_shared_env_files(root: Path, registry: Registry) -> None:
    """Two environments whose env files resolve to one file would read and write each other's names."""
    seen: dict[Path, EnvSpec] = {}
    for spec in registry.specs:
        resolved = (root / spec.default_env_file()).resolve()
        other = seen.setdefault(resolved, spec)
        if other is not spec:
            raise ConfigError(f"environments {other.name} and {spec.name} would share the env file "
                              f"{other.default_env_file()!r} / {spec.default_env_file()!r} (both are "
                              f"{str(resolved)!r}); set env_file in {CONFIG_FILE} to a file of its own")


def _resolve(project: Project, spec: EnvSpec, env_file: Path | None,
             overrides: Mapping[str, str | None], one_of_many: bool) -> Environment:
    if env_file is not None:
        env_file = Path(env_file)
        if not env_file.is_file():
            raise ConfigError(f"env file {str(env_file)!r} does not exist")
        refuse_foreign_env_file(project, spec, env_file, "--env-file")
        file_values = _read_env_file(env_file)
    else:
        env_file = project.root / spec.default_env_file()
        file_values = _read_env_file(env_file) if env_file.is_file() else {}
        if not file_values and not env_file.is_file():
            env_file = None

    def lookup(key: str) -> str | None:
        process = {} if one_of_many and key in ISOLATION_VARS else project.environ
        for source in (overrides, process, file_values):
            value = source.get(key)
            if value is not None and value != "":
                return value
        return None

    primary = spec.primary
    schema = validate_schema(lookup("DATABASE_SCHEMA") or spec.default_schema(), primary=primary)
    database = validate_mongo_database(lookup("MONGODB_DATABASE") or spec.default_database())
    collection = validate_collection(lookup("QDRANT_COLLECTION") or spec.default_collection())
    prefix = validate_redis_prefix(lookup("MOMENTRY_REDIS_PREFIX") or spec.default_prefix())
    _refuse_foreign_names(project.registry, spec, schema, database, collection, prefix)

    data_root = Path(lookup("MOMENTRY_DATA_ROOT") or Path.home() / "momentry").expanduser()
    output_dir = Path(lookup("MOMENTRY_OUTPUT_DIR")
                      or data_root / ("output" if primary else f"output_{spec.slug}"))
    backup_dir = Path(lookup("MOMENTRY_BACKUP_DIR") or data_root / "backup" / spec.root)
    port_text = lookup("MOMENTRY_SERVER_PORT")
    try:
        port = int(port_text) if port_text else spec.default_port()
    except ValueError:
        raise ConfigError(f"MOMENTRY_SERVER_PORT must be a number, not {port_text!r}") from None
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"{spec.name}'s server port {port} is not between 1 and 65535")
    worker = lookup("MOMENTRY_WORKER_ENABLED")
    worker_enabled = primary if worker is None else worker.strip().lower() in {"1", "true", "yes", "on"}

    pg_lock_timeout = validate_pg_duration(lookup("MOMENTRY_PG_LOCK_TIMEOUT") or "5s",
                                           "--pg-lock-timeout / MOMENTRY_PG_LOCK_TIMEOUT")
    pg_statement_timeout = validate_pg_duration(lookup("MOMENTRY_PG_STATEMENT_TIMEOUT") or "30min",
                                                "--pg-statement-timeout / MOMENTRY_PG_STATEMENT_TIMEOUT")
    database_url = lookup("DATABASE_URL")
    pg_grants = _switch("MOMENTRY_PG_GRANTS", lookup("MOMENTRY_PG_GRANTS"),
                        "off leaves PostgreSQL roles and grants to you")
    api_key = lookup("QDRANT_API_KEY")
    return Environment(
        name=spec.name,
        primary=primary,
        root=spec.root,
        schema=schema,
        mongo_database=database,
        qdrant_collection=collection,
        redis_prefix=prefix,
        output_dir=output_dir,
        backup_dir=backup_dir,
        server_port=port,
        worker_enabled=worker_enabled,
        env_file=env_file,
        state_dir=project.state_dir,
        embedded=project.embedded,
        pg_lock_timeout=pg_lock_timeout,
        pg_statement_timeout=pg_statement_timeout,
        pg_role=validate_role(spec.default_role()),
        pg_grants=pg_grants,
        database_url=SecretURL(normalize_database_url(check_url("DATABASE_URL", database_url)))
        if database_url else None,
        mongodb_url=_url(check_url("MONGODB_URL", lookup("MONGODB_URL"))),
        qdrant_url=_url(check_url("QDRANT_URL", lookup("QDRANT_URL"))),
        qdrant_api_key=Secret(api_key) if api_key else None,
        redis_url=_url(check_url("REDIS_URL", lookup("REDIS_URL"))),
    )


# The administrative URLs grant uses (never an environment's own: they may create and drop users).
ADMIN_URL_VARS = {"redis": "MOMENTRY_REDIS_ADMIN_URL", "mongo": "MOMENTRY_MONGO_ADMIN_URL"}
SECRET_VARS = ("DATABASE_URL", "MONGODB_URL", "QDRANT_URL", "REDIS_URL", "QDRANT_API_KEY", *ADMIN_URL_VARS.values())


def secret_values(key: str, value: str) -> list[str | Secret]:
    """The secrets a connection setting holds: the key itself, or a URL's passwords and the URL."""
    if key == "QDRANT_API_KEY":
        return [value]
    parts = secret_parts(value)
    return [*parts, SecretURL(value)] if parts else []


def _url(value: str | None) -> SecretURL | None:
    return SecretURL(value) if value else None


def _refuse_foreign_names(registry: Registry, spec: EnvSpec, schema: str, database: str,
                          collection: str, prefix: str) -> None:
    """Refuse a name that reaches another environment's data, so dev can never be pointed at prod."""
    mine = {"schema": schema, "MongoDB database": database, "Qdrant collection": collection, "Redis prefix": prefix}
    found = [(j, k, label) for k, label in enumerate(mine)
             for j in registry.index(label).clashing(mine[label]) if registry.specs[j].name != spec.name]
    if found:
        j, _, label = min(found)  # the first other environment, in declaration order
        other = registry.specs[j]
        theirs = registry.index(label).values[j]
        raise ConfigError(
            f"{spec.name}'s {label} {mine[label]!r} reaches environment {other.name}'s {theirs!r}; "
            f"check DATABASE_SCHEMA / MONGODB_DATABASE / QDRANT_COLLECTION / "
            f"MOMENTRY_REDIS_PREFIX for {spec.name}"
        )


def normalize_database_url(url: str) -> str:
    """Accept postgres://, postgresql:// and postgresql+psycopg:// and use psycopg 3."""
    from .environments import mask_url

    for scheme in _PG_SCHEMES:
        if url.startswith(scheme):
            return "postgresql+psycopg://" + _escape_at_in_userinfo(url[len(scheme):])
    raise ConfigError(
        f"DATABASE_URL {mask_url(url)!r} is not a PostgreSQL URL; "
        "use postgres://, postgresql:// or postgresql+psycopg://"
    )


_REDIS_PARAMS = {"client_name", "decode_responses", "encoding", "encoding_errors", "ssl_ca_certs", "ssl_ca_path",
                 "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_ciphers", "username",
                 "password"}


_SCHEMES = {"MONGODB_URL": ("mongodb://", "mongodb+srv://"), "QDRANT_URL": ("http://", "https://"),
            "REDIS_URL": ("redis://", "rediss://", "unix://")}


def check_url(variable: str, url: str | None) -> str | None:
    """Check a connection URL's scheme, port, host list and parameters before anything connects.

    The host is read after the user info as ``userinfo_end`` reads it, the reading the driver gets.
    """
    from urllib.parse import urlsplit

    from .environments import mask_url, userinfo_end

    if not url:
        return url
    if variable == "DATABASE_URL" and not url.startswith(_PG_SCHEMES):
        normalize_database_url(url)  # refuses it, naming the schemes
    shown = f"{variable} {mask_url(url)!r}"
    if variable in _SCHEMES and not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*::*//", url):
        *others, last = _SCHEMES[variable]
        raise ConfigError(f"{shown} has no scheme; use {', '.join(others)} or {last}")
    scheme, sep, rest = url.partition("://")
    parts = urlsplit(f"{scheme}://{rest[userinfo_end(rest) + 1:]}" if sep else url)
    _check_authority(variable, shown, parts.scheme, parts.netloc.rpartition("@")[2], parts.query)
    return url


def _check_authority(variable: str, shown: str, scheme: str, host_part: str, query: str) -> None:
    from urllib.parse import parse_qsl, urlsplit

    if "," in host_part and not (variable == "MONGODB_URL" and scheme == "mongodb"):
        raise ConfigError(f"{shown} names several hosts; give one host and port")
    for host in host_part.split(","):
        try:
            urlsplit(f"//{host}").port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            port = host.rpartition(":")[2]
            raise ConfigError(f"{shown}: port {port!r} is not a number between 0 and 65535") from None
    try:
        params = [k for k, _ in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))]
    except ValueError:
        raise ConfigError(f"{shown}: the query string cannot be parsed; write ?name=value&name=value") from None
    known = _known_params(variable, params)
    unknown = [k for k in params if k not in known]
    if unknown and variable == "QDRANT_URL":
        raise ConfigError(f"{shown}: unknown parameter {unknown[0]!r}; a Qdrant URL takes none "
                          "(put the API key in QDRANT_API_KEY)")
    if unknown:
        raise ConfigError(f"{shown}: unknown parameter {unknown[0]!r}; remove it or use one "
                          f"{_PARAM_SOURCE[variable]} knows")


def _known_params(variable: str, params: list[str]) -> set[str] | frozenset[str]:
    if not params:
        return set()
    if variable == "DATABASE_URL":
        return _libpq_keywords()
    if variable == "MONGODB_URL":
        from pymongo.common import URI_OPTIONS_ALIAS_MAP, URI_OPTIONS_VALIDATOR_MAP

        known = {k.lower() for k in (*URI_OPTIONS_VALIDATOR_MAP, *URI_OPTIONS_ALIAS_MAP)}
        return {p for p in params if p.lower() in known}
    if variable == "REDIS_URL":
        from redis.connection import URL_QUERY_ARGUMENT_PARSERS

        return set(URL_QUERY_ARGUMENT_PARSERS) | _REDIS_PARAMS
    return set()  # QDRANT_URL: the client takes no URL parameters


@functools.cache
def _libpq_keywords() -> frozenset[str]:
    """The connection parameters this libpq knows (read once: every environment's URL is checked)."""
    from psycopg import pq

    return frozenset(o.keyword.decode() for o in pq.Conninfo.get_defaults())


_PARAM_SOURCE = {"DATABASE_URL": "libpq", "MONGODB_URL": "pymongo", "REDIS_URL": "redis-py"}


def _escape_at_in_userinfo(rest: str) -> str:
    """Percent-encode the URL delimiters inside the user info, which ends where ``userinfo_end`` says.

    SQLAlchemy ends the password at the first '@' and the authority at the first '/', so
    ``u:p@ss@host/db`` would otherwise reach host ``ss@host``, and ``u:a@evil:5432/x@host/db``
    host ``evil``, with part of the password shown in the error. Every '@', '/', '?' and '#' in
    the user info, and each ':' after the one that ends the user name, is encoded.
    """
    from .environments import userinfo_end

    at = userinfo_end(rest)
    if at < 0:
        return rest
    user, colon, password = rest[:at].partition(":")
    encode = {"@": "%40", "/": "%2F", "?": "%3F", "#": "%23", ":": "%3A"}
    user = re.sub(r"[@/?#]", lambda m: encode[m.group()], user)
    password = re.sub(r"[@/?#:]", lambda m: encode[m.group()], password)
    return user + colon + password + rest[at:]

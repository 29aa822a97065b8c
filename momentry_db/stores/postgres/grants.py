"""Privileges: one NOLOGIN group role per environment, its grants, and the logins that belong to it.

An environment's role may use its own schema's tables and sequences, and, for any role but
prod's, the shared tables and views in public and nothing else there: not one privilege on
public's isolated tables. A login granted to the environment inherits exactly that and gets
``search_path = <schema>, public``, so an unqualified name reaches the environment's table, a
shared table in public, or, when the environment's table is missing, a "permission denied"
instead of prod's copy. What a role should hold is computed from the catalogs and the models'
marking; only what is missing (or forbidden and held) is written, so a no-op run writes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ...environments import PRIMARY_SCHEMA, Environment, scrub
from ...errors import ConfigError, RefusedError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

from .connection import LOCK_CLASS, PgTarget, connect
from .planning import Scopes

#: Every table privilege that verify checks a non-prod role does not hold on public's isolated tables.
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
DML = ("SELECT", "INSERT", "UPDATE", "DELETE")
SEQUENCE_PRIVILEGES = ("USAGE", "SELECT")
_FORBIDDEN_SEQUENCE = ("USAGE", "SELECT", "UPDATE")
#: Serializes grant writes across runs: GRANTs on one table from two sessions at once can fail.
_GRANTS_LOCK = f"SELECT pg_advisory_xact_lock({LOCK_CLASS}, hashtext('momentry-db grants'))"

_RELATIONS = """
SELECT n.nspname, c.relname, c.relkind,
       CASE c.relkind WHEN 'S' THEN
       (SELECT t.relname FROM pg_depend d JOIN pg_class t ON t.oid = d.refobjid
        WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.refclassid = 'pg_class'::regclass
          AND d.deptype IN ('a', 'i') LIMIT 1) END,
       c.oid::bigint, CASE WHEN c.relacl IS NULL THEN c.relowner::bigint END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(CAST(:schemas AS text[])) AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
ORDER BY 1, 2
"""
# The questions come as one JSON array (a role, kind, schema, object and privilege each): thousands
# of them cost one parameter. A relation is asked about by its oid when one was read (no name to
# parse), by its qualified name otherwise. The privilege may list several ("SELECT, INSERT"): then
# the answer is whether any of them is held.
_ASK = """
FROM json_array_elements(CAST(:asks AS json)) WITH ORDINALITY AS a(x, i),
     LATERAL (SELECT x->>0, x->>1, x->>2, x->>3, x->>4, (x->>5)::bigint) AS q(r, k, s, n, p, o),
     LATERAL (SELECT CASE k
        WHEN 'schema' THEN has_schema_privilege(CAST(r AS name), s, p)
        WHEN 'function' THEN has_function_privilege(CAST(r AS name), CAST(n AS oid), p)
        WHEN 'sequence' THEN CASE WHEN o IS NULL THEN has_sequence_privilege(CAST(r AS name), format('%I.%I', s, n), p)
                                  ELSE has_sequence_privilege(CAST(r AS name), CAST(o AS oid), p) END
        ELSE CASE WHEN o IS NULL THEN has_table_privilege(CAST(r AS name), format('%I.%I', s, n), p)
                  ELSE has_table_privilege(CAST(r AS name), CAST(o AS oid), p) END END) AS h(held)
"""
_HELD = "SELECT held " + _ASK + "ORDER BY i"
# Only the answers that are not the one expected (each ask's seventh element): a run that finds
# everything in place transfers nothing. A dropped object (NULL) counts as not held.
_UNEXPECTED = "SELECT i - 1 " + _ASK + "WHERE coalesce(held, false) <> CAST(x->>6 AS boolean)"
_EXISTING_ROLES = "SELECT rolname::text FROM pg_roles WHERE rolname = ANY(CAST(:roles AS text[]))"
# Roles that may hold a privilege on a relation whose ACL is still the default (its owner's alone):
# superusers, members of one of those owners, and members of the roles that read or write all data.
_OWNER_RIGHTS = """
SELECT r.rolname::text FROM pg_roles r
WHERE r.rolname = ANY(CAST(:roles AS text[]))
  AND (r.rolsuper OR EXISTS (
      SELECT 1 FROM pg_roles o
      WHERE (o.oid = ANY(CAST(:owners AS bigint[])) OR o.rolname IN ('pg_read_all_data', 'pg_write_all_data'))
        AND pg_has_role(r.oid, o.oid, 'USAGE')))
"""
# Roles that hold nothing of their own in this database: no superuser, a member of no role, not the
# database's owner (a member of pg_database_owner, which owns schema public), and named by no object
# here (pg_shdepend lists every role an object's ACL names or that owns it). Each holds what PUBLIC
# holds, no more, so one of them answers for all. OFFSET 0 keeps the last test a probe of
# pg_shdepend's index per role: as an anti join, with the catalog's statistics, it rescanned every
# dependency of the database once per role (0.9 s at 500 roles).
_BLANK = """
SELECT r.rolname::text FROM pg_roles r
WHERE r.rolname = ANY(CAST(:roles AS text[])) AND NOT r.rolsuper
  AND r.oid <> (SELECT datdba FROM pg_database WHERE datname = current_database())
  AND NOT EXISTS (SELECT 1 FROM pg_auth_members a WHERE a.member = r.oid)
  AND NOT EXISTS (SELECT 1 FROM pg_shdepend d WHERE d.refclassid = 'pg_authid'::regclass AND d.refobjid = r.oid
                  AND d.dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) OFFSET 0)
"""
_HAS_ROLE = "SELECT pg_has_role(CAST(:m AS name), CAST(:r AS name), 'MEMBER')"
_ROLE = "SELECT rolcanlogin, rolsuper FROM pg_roles WHERE rolname = :r"
_MAY_MANAGE = "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
_PUBLIC_CREATE = """
SELECT EXISTS (SELECT 1 FROM pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
               WHERE n.nspname = 'public' AND a.grantee = 0 AND a.privilege_type = 'CREATE')
"""
_MEMBERS = """
WITH RECURSIVE m(oid) AS (
    SELECT a.member FROM pg_auth_members a JOIN pg_roles g ON g.oid = a.roleid WHERE g.rolname = :r
    UNION SELECT a.member FROM pg_auth_members a JOIN m ON a.roleid = m.oid)
SELECT r.rolname, r.rolcanlogin, r.rolsuper FROM pg_roles r JOIN m ON m.oid = r.oid ORDER BY 1
"""
_DIRECT_MEMBER = """
SELECT EXISTS (SELECT 1 FROM pg_auth_members a JOIN pg_roles g ON g.oid = a.roleid
               JOIN pg_roles m ON m.oid = a.member WHERE g.rolname = :r AND m.rolname = :m)
"""
# The setting a new session of the login gets: one for this database wins over one for every database.
_SEARCH_PATH = """
SELECT substr(c, length('search_path=') + 1) FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole,
       unnest(s.setconfig) c
WHERE r.rolname = :m AND c LIKE 'search_path=%'
  AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
ORDER BY s.setdatabase DESC LIMIT 1
"""
# Functions that run with their owner's rights can read what the caller may not: outside the
# environment's schema, a role must not be able to call one.
_DEFINER_FUNCTIONS = """
SELECT n.nspname, p.oid::text, p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE p.prosecdef AND n.nspname <> ALL(CAST(:skip AS text[])) ORDER BY 3
"""


@dataclass(frozen=True)
class Privilege:
    """One privilege on one object: ``USAGE on schema dev``, ``SELECT on public.api_keys``."""

    kind: str  # schema, table (views too), sequence or function
    schema: str
    name: str  # the object's name; for a function its oid, shown as ``shown``
    privilege: str
    shown: str = ""
    oid: int | None = field(default=None, compare=False)  # a relation's, when read from the catalogs
    #: the relation's owner, when its ACL is still the default: no GRANT has given anyone else anything
    owner_only: int | None = field(default=None, compare=False)

    def __str__(self) -> str:
        if self.kind == "schema":
            return f"{self.privilege} on schema {self.schema}"
        return f"{self.privilege} on {self.shown or f'{self.schema}.{self.name}'}"


@dataclass(frozen=True)
class Relation:
    """A table, view or sequence of the environment's schema or public, as the catalogs list it."""

    schema: str
    name: str
    kind: str  # pg_class.relkind: r, p, v, m or S
    owner_table: str | None = None  # for a sequence, the table whose column owns it
    oid: int | None = None
    owner_only: int | None = None  # the owner, when the ACL is the default (no GRANT made on it yet)


def search_path_for(env: Environment) -> tuple[str, ...]:
    """What an environment's logins resolve names through: the schema, then public for the shared tables."""
    return (PRIMARY_SCHEMA,) if env.primary else (env.schema, PRIMARY_SCHEMA)


def wanted(env: Environment, relations: Sequence[Relation], scopes: Scopes) -> list[Privilege]:
    """Every privilege the environment's role needs: its schema's tables and sequences, and (for any
    environment but prod) the shared tables, their sequences and the shared views in public."""
    out = [Privilege("schema", s, "", "USAGE") for s in search_path_for(env)]
    for rel in relations:
        mine = rel.schema == env.schema
        shared = rel.schema == PRIMARY_SCHEMA and not env.primary
        if rel.kind in ("r", "p") and (mine and rel.name not in scopes.bookkeeping
                                       or shared and rel.name in scopes.shared):
            out += [Privilege("table", rel.schema, rel.name, p, oid=rel.oid, owner_only=rel.owner_only) for p in DML]
        elif rel.kind in ("v", "m") and (mine or shared and rel.name in scopes.views):
            out.append(Privilege("table", rel.schema, rel.name, "SELECT", oid=rel.oid, owner_only=rel.owner_only))
        elif rel.kind == "S" and (mine and rel.owner_table not in scopes.bookkeeping
                                  or shared and rel.owner_table in scopes.shared):
            out += [Privilege("sequence", rel.schema, rel.name, p, oid=rel.oid, owner_only=rel.owner_only)
                    for p in SEQUENCE_PRIVILEGES]
    return out


def forbidden(env: Environment, relations: Sequence[Relation], scopes: Scopes) -> list[Privilege]:
    """What a non-prod role must never hold: any privilege on public's isolated tables and their sequences."""
    if env.primary:
        return []
    out: list[Privilege] = []
    for rel in relations:
        if rel.schema != PRIMARY_SCHEMA:
            continue
        if rel.kind in ("r", "p") and rel.name in scopes.isolated:
            out += [Privilege("table", rel.schema, rel.name, p, oid=rel.oid) for p in TABLE_PRIVILEGES]
        elif rel.kind == "S" and rel.owner_table in scopes.isolated:
            out += [Privilege("sequence", rel.schema, rel.name, p, oid=rel.oid) for p in _FORBIDDEN_SEQUENCE]
    return out


def _relations(conn: Connection, schemas: Collection[str]) -> list[Relation]:
    """The tables, views and sequences of ``schemas``, in one read."""
    import sqlalchemy as sa

    rows = conn.execute(sa.text(_RELATIONS), {"schemas": sorted(set(schemas))})
    return [Relation(*row) for row in rows]


def _held_by(conn: Connection, asks: Sequence[tuple[str, Privilege]]) -> list[bool]:
    """Whether each role holds its privilege, directly, through a role it belongs to, or through PUBLIC,
    in one read however many roles and privileges are asked about."""
    import json

    import sqlalchemy as sa

    if not asks:
        return []
    questions = json.dumps([[r, p.kind, p.schema, p.name, p.privilege, p.oid] for r, p in asks])
    return list(conn.execute(sa.text(_HELD), {"asks": questions}).scalars())


def _unexpected(conn: Connection, asks: Sequence[tuple[str, Privilege, bool]]) -> set[int]:
    """The positions of the asks (role, privilege, whether it is expected to be held) whose answer is
    not the expected one, in one read."""
    import json

    import sqlalchemy as sa

    if not asks:
        return set()
    questions = json.dumps([[r, p.kind, p.schema, p.name, p.privilege, p.oid, held] for r, p, held in asks])
    return set(conn.execute(sa.text(_UNEXPECTED), {"asks": questions}).scalars())


def _held(conn: Connection, role: str, privileges: Sequence[Privilege]) -> list[bool]:
    """Whether ``role`` holds each privilege (see ``_held_by``)."""
    return _held_by(conn, [(role, p) for p in privileges])


def _existing_roles(conn: Connection, roles: Collection[str]) -> set[str]:
    import sqlalchemy as sa

    return set(conn.execute(sa.text(_EXISTING_ROLES), {"roles": sorted(set(roles))}).scalars())


def _role(conn: Connection, name: str) -> tuple[bool, bool] | None:
    """(can log in, superuser) of a role, or None when it does not exist."""
    import sqlalchemy as sa

    row = conn.execute(sa.text(_ROLE), {"r": name}).first()
    return None if row is None else (bool(row[0]), bool(row[1]))


def _may_manage_roles(conn: Connection) -> bool:
    import sqlalchemy as sa

    return bool(conn.execute(sa.text(_MAY_MANAGE)).scalar())


# --- keeping an environment's grants current (migrate) -----------------------------------------


@dataclass
class _Changes:
    """What one environment's role lacks, or holds and must not; written only when not empty."""

    create_role: bool = False
    grant: list[Privilege] = field(default_factory=list)
    revoke: list[Privilege] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.create_role or bool(self.grant or self.revoke)


@dataclass(frozen=True)
class _Job:
    """One role to make current: an environment's own, or (from prod's run, ``public_only``) another
    environment's existing role on public's shared objects. ``owner`` is the environment whose run
    reports it."""

    env: Environment
    owner: Environment
    public_only: bool = False


def _plan(conn: Connection, jobs: Sequence[_Job], scopes: Scopes) -> tuple[list[tuple[_Job, _Changes]], bool]:
    """What each job's role lacks, or holds and must not, read in three queries however many jobs there
    are; and whether PUBLIC may still create in public. Jobs are planned in order, as if each earlier
    one were already written, so two jobs on one role never grant the same privilege twice."""
    by_schema: dict[str, list[Relation]] = {}
    for rel in _relations(conn, {PRIMARY_SCHEMA, *(j.env.schema for j in jobs)}):
        by_schema.setdefault(rel.schema, []).append(rel)
    public = by_schema.get(PRIMARY_SCHEMA, [])
    existing = _existing_roles(conn, [j.env.pg_role for j in jobs])
    wants: list[tuple[_Job, list[Privilege], list[Privilege]]] = []
    shared: tuple[list[Privilege], list[Privilege]] | None = None  # public's part: one for every non-prod role
    for job in jobs:
        env = job.env
        if job.public_only or env.primary:
            want = wanted(env, public, scopes)
            if job.public_only:
                want = [p for p in want if p.schema == PRIMARY_SCHEMA]
            wants.append((job, want, forbidden(env, public, scopes)))
            continue
        if shared is None:
            shared = [p for p in wanted(env, public, scopes) if p.kind != "schema"], forbidden(env, public, scopes)
        wants.append((job, wanted(env, by_schema.get(env.schema, []), scopes) + shared[0], shared[1]))
    held = _held_plan(conn, [(job.env.pg_role, want, deny) for job, want, deny in wants if job.env.pg_role in existing])
    # granted (or revoked) by an earlier job: kept only for a role with more than one job (prod's run)
    repeated = {role for role, n in Counter(job.env.pg_role for job in jobs).items() if n > 1}
    planned: set[tuple[str, Privilege]] = set()
    created: set[str] = set()
    out: list[tuple[_Job, _Changes]] = []
    for job, want, deny in wants:
        role = job.env.pg_role
        if role not in existing and (job.public_only or role in created):
            if job.public_only:
                continue  # another environment's role that does not exist yet: its own run creates it
            changes = _Changes(grant=[p for p in want if (role, p) not in planned])
        elif role not in existing:
            changes = _Changes(create_role=True, grant=list(want))
            created.add(role)
        else:
            earlier = planned if role in repeated else ()
            changes = _Changes(grant=[p for p in want if not held[(role, p)] and (role, p) not in earlier],
                               revoke=[p for p in deny if held.forbidden(role, p) and (role, p) not in earlier])
        if role in repeated:
            planned.update((role, p) for p in (*changes.grant, *changes.revoke))
        if changes:
            out.append((job, changes))
    return out, _public_may_create(conn)


class _Held:
    """What ``_held_plan`` found: ``held[(role, privilege)]`` says whether the role holds a privilege
    it wants, ``held.forbidden(role, privilege)`` whether it holds one it must not. Only the
    exceptions are kept (a wanted privilege missing, a forbidden one held), so a plan over hundreds
    of roles builds no entry per privilege; a role that holds nothing of its own (``blank``) is
    answered for by ``stand_in``, one of them."""

    def __init__(self, owner_rights: set[str], missing: set[tuple[str, Privilege]],
                 forbidden_held: set[tuple[str, Privilege]], blank: Collection[str] = (), stand_in: str = "") -> None:
        self.owner_rights, self.missing, self.forbidden_held = owner_rights, missing, forbidden_held
        self.blank, self.stand_in = blank, stand_in

    def __getitem__(self, key: tuple[str, Privilege]) -> bool:
        if key[1].owner_only is not None and key[0] not in self.owner_rights:
            return False  # a relation no GRANT has touched: nobody else holds anything on it
        return (self.stand_in if key[0] in self.blank else key[0], key[1]) not in self.missing

    def forbidden(self, role: str, privilege: Privilege) -> bool:
        return (self.stand_in if role in self.blank else role, privilege) in self.forbidden_held


def _held_plan(conn: Connection, roles: Sequence[tuple[str, list[Privilege], list[Privilege]]]) -> _Held:
    """Whether each role holds each privilege it wants and each it must not hold. A forbidden
    object's privileges are asked about together (is any held?), and only the answers that are not
    the expected ones come back, so the common case (everything wanted held, nothing forbidden) is
    one read that returns nothing; objects found to hold a forbidden privilege are asked again, one
    privilege at a time. A relation whose ACL is still the default (a table just created) is asked
    about only for the roles that can hold something on it (``_OWNER_RIGHTS``): superusers, the
    owner's members, and members of pg_read_all_data or pg_write_all_data. The roles that hold nothing
    of their own here (``_BLANK``: existing roles in a new database, say) hold what PUBLIC holds, so
    each question about them is asked once, for one of them."""
    import sqlalchemy as sa

    names = sorted({r for r, _, _ in roles})
    owners = sorted({p.owner_only for _, want, _ in roles for p in want if p.owner_only is not None})
    owner_rights = set(conn.execute(sa.text(_OWNER_RIGHTS), {"roles": names, "owners": owners}).scalars()
                       ) if owners else set()
    blank = set(conn.execute(sa.text(_BLANK), {"roles": names}).scalars()) if len(names) > 1 else set()
    stand_in = min(blank, default="")
    asks: dict[tuple[str, Privilege, bool], None] = {}  # in order, each once
    for role, want, deny in roles:
        asker = stand_in if role in blank else role
        for p in want:
            if role in owner_rights or p.owner_only is None:
                asks[asker, p, True] = None
        objects: dict[tuple[str, str, str], list[Privilege]] = {}
        for p in deny:
            objects.setdefault((p.kind, p.schema, p.name), []).append(p)
        for ps in objects.values():
            asks[asker, replace(ps[0], privilege=", ".join(p.privilege for p in ps)), False] = None
    asked = list(asks)
    missing: set[tuple[str, Privilege]] = set()
    again: list[tuple[str, Privilege]] = []
    for i in _unexpected(conn, asked):
        role, p, expected = asked[i]
        if expected:
            missing.add((role, p))
        else:
            again += [(role, replace(p, privilege=one.strip())) for one in p.privilege.split(",")]
    found = {ask for ask, yes in zip(again, _held_by(conn, again)) if yes}
    return _Held(owner_rights, missing, found, blank, stand_in)


def _public_may_create(conn: Connection) -> bool:
    import sqlalchemy as sa

    return bool(conn.execute(sa.text(_PUBLIC_CREATE)).scalar())


def _statements(changes: Sequence[tuple[str, _Changes]]) -> list[str]:
    """The SQL that makes every role's change: the missing roles created in one statement, then one
    GRANT (or REVOKE) per kind of object, set of privileges and set of roles, so an object that many
    roles need (a shared table in public) has its privilege list rewritten once, not once per role."""
    from psycopg import sql

    out: list[sql.Composable] = []
    creating = [role for role, c in changes if c.create_role]
    if creating:
        # Another database of the cluster may create one at the same moment: roles are cluster-wide.
        out.append(sql.SQL(
            "DO $momentry$ DECLARE r text; BEGIN FOREACH r IN ARRAY {} LOOP BEGIN "
            "EXECUTE 'CREATE ROLE ' || quote_ident(r) || ' NOLOGIN'; EXCEPTION WHEN duplicate_object OR unique_violation "
            "THEN NULL; END; END LOOP; END $momentry$").format(
            sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(sql.Literal(r) for r in creating))))
    for verb, to in (("GRANT", "TO"), ("REVOKE", "FROM")):
        held: dict[tuple[str, str, str], dict[str, list[str]]] = {}  # object -> role -> privileges
        for role, c in changes:
            for p in c.grant if verb == "GRANT" else c.revoke:
                held.setdefault((p.kind, p.schema, p.name), {}).setdefault(role, []).append(p.privilege)
        groups: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[tuple[str, str]]] = {}
        for (kind, schema, name), by_role in held.items():
            by_privileges: dict[tuple[str, ...], list[str]] = {}
            for role, privileges in by_role.items():
                by_privileges.setdefault(tuple(privileges), []).append(role)
            for privileges, roles in by_privileges.items():
                groups.setdefault((kind, privileges, tuple(roles)), []).append((schema, name))
        for (kind, privileges, roles), objects in groups.items():
            names = sql.SQL(", ").join(sql.Identifier(schema) if kind == "schema"
                                       else sql.Identifier(schema, name) for schema, name in objects)
            out.append(sql.SQL("{verb} {privileges} ON {kind} {names} {to} {roles}").format(
                verb=sql.SQL(verb), privileges=sql.SQL(", ".join(privileges)), kind=sql.SQL(kind.upper()),
                names=names, to=sql.SQL(to), roles=sql.SQL(", ").join(sql.Identifier(r) for r in roles)))
    return [s.as_string(None) for s in out]


#: What a role's grants depend on, in one read per database: the relations of each schema (name and
#: kind); each schema's ACLs but public's, whole (its own and its relations'); and in public, the
#: ACL entries of each role and of PUBLIC, role by role: its shared tables list every environment's
#: role, and one role's change there must not move the others' state. Role names are plain
#: identifiers (``validate_role``), so an ACL item's text names them as they are.
_STATE = """
WITH roles AS (  -- a set joined by hash: with hundreds of roles, = ANY(array) per ACL entry is what costs
    SELECT r.oid, r.rolname::text AS name FROM pg_roles r JOIN unnest(CAST(:roles AS text[])) AS u(n) ON u.n = r.rolname
), spaces AS (
    SELECT n.oid, n.nspname::text AS s, coalesce(n.nspacl, acldefault('n', n.nspowner)) AS acl
    FROM pg_namespace n WHERE n.nspname = ANY(CAST(:schemas AS text[]))
), rels AS (
    SELECT sp.s, c.relname::text AS name, c.relkind::text AS kind, c.relacl AS acl
    FROM pg_class c JOIN spaces sp ON sp.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S')
), acls AS (  -- each ACL item as text, "grantee=privileges/grantor" (PUBLIC's grantee is empty): aclexplode
    -- detoasts the whole ACL once per privilege, and public's shared tables list every environment's role
    SELECT r.name, i FROM rels r, unnest(CAST(r.acl AS text[])) AS i WHERE r.s = 'public'
    UNION ALL
    SELECT '', i FROM spaces sp, unnest(CAST(sp.acl AS text[])) AS i WHERE sp.s = 'public'
), entries AS (
    SELECT name, split_part(i, '=', 1) AS grantee, split_part(split_part(i, '=', 2), '/', 1) AS privileges FROM acls
)
SELECT 'schema', s, md5(string_agg(name || ':' || kind, ',' ORDER BY name)) FROM rels GROUP BY s
UNION ALL
SELECT 'acls', sp.s, md5(max(sp.acl::text) || '|'
                         || coalesce(string_agg(r.name || ':' || coalesce(r.acl::text, ''), ',' ORDER BY r.name), ''))
FROM spaces sp LEFT JOIN rels r ON r.s = sp.s WHERE sp.s <> 'public' GROUP BY sp.s
UNION ALL
SELECT 'acl', e.grantee || '@public', md5(string_agg(e.name || ':' || e.privileges, ',' ORDER BY e.name, e.privileges))
FROM entries e WHERE e.grantee = '' OR e.grantee IN (SELECT name FROM roles)
GROUP BY e.grantee
UNION ALL
SELECT 'stamp', name, shobj_description(oid, 'pg_authid') FROM roles
UNION ALL
SELECT 'database', '', current_database()
"""
_STAMP_PREFIX = "momentry-db grants v2 "


def _grant_state(conn: Connection, envs: Sequence[Environment]) -> dict[tuple[str, str], str | None]:
    """``_STATE`` for ``envs``' schemas and roles (and public), keyed by (what, name)."""
    import sqlalchemy as sa

    rows = conn.execute(sa.text(_STATE), {"schemas": sorted({PRIMARY_SCHEMA, *(e.schema for e in envs)}),
                                          "roles": sorted({e.pg_role for e in envs})})
    return {(what, name): value for what, name, value in rows}


def _fingerprint(state: dict[tuple[str, str], str | None], env: Environment, others: Sequence[Environment]) -> str:
    """What ``env``'s grants were last made current against: its schema's and public's relations, its
    schema's ACLs, the ACL entries in public of its role (and, for prod, of the other roles) and of
    PUBLIC, in this database."""
    import hashlib

    def acl(role: str) -> str | None:
        return state.get(("acl", f"{role}@{PRIMARY_SCHEMA}"))

    parts = [state.get(("database", "")), env.schema, env.pg_role, state.get(("schema", env.schema)),
             state.get(("schema", PRIMARY_SCHEMA)), state.get(("acls", env.schema)), acl(""), acl(env.pg_role)]
    for other in sorted(others, key=lambda e: e.pg_role):  # prod keeps the others' roles current in public
        parts += [other.pg_role, ("stamp", other.pg_role) in state, acl(other.pg_role)]
    return _STAMP_PREFIX + hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


def _stamp(conn: Connection, ensured: Sequence[tuple[Environment, Sequence[Environment]]]) -> None:
    """Record on each role just made current (its comment) the state its grants were made current
    against, read once for all of them, so a later run that finds the same state skips reading every
    privilege. A login that may not comment on a role only loses that shortcut."""
    from psycopg import sql
    from sqlalchemy.exc import DBAPIError

    if not ensured:
        return
    try:
        state = _grant_state(conn, [e for env, others in ensured for e in (env, *others)])
        conn.exec_driver_sql(";\n".join(sql.SQL("COMMENT ON ROLE {} IS {}").format(
            sql.Identifier(env.pg_role), sql.Literal(_fingerprint(state, env, others))).as_string(None)
            for env, others in ensured))
        conn.commit()
    except DBAPIError:
        conn.rollback()


def ensure_grants(targets: Sequence[PgTarget], everyone: Sequence[Environment] = (), *,
                  changed: Collection[str] = (), streamed: Streamed | None = None,
                  scopes: Callable[[], Scopes] = Scopes.of_models) -> list[str]:
    """Bring each target environment's role and grants up to date; return one notice per environment
    whose grants changed or could not be managed, in the targets' order.

    The role is created when missing (which needs CREATEROLE), then granted what it lacks, and a
    non-prod role loses any privilege on public's isolated tables. PUBLIC loses CREATE on schema
    public (PostgreSQL before 15 grants it), so no login can plant a table or function there. When
    prod is among the targets, every other environment's existing role in ``everyone`` is also
    kept current on public's shared tables and views. Nothing is written when nothing is missing.
    A role whose stamp shows that nothing it depends on moved is not read at all, unless its schema
    is named in ``changed`` (just upgraded). The rest are read and written together, in a handful of
    round trips however many environments there are. The environments ``streamed`` names were made
    current earlier in the run (:class:`Alongside`): they are left alone, and their notices come
    back with the rest. ``scopes`` names the models' tables and views (``Kept.scopes``, or the
    models themselves); it is called only when a role is planned.
    """
    from ...errors import MomentryError

    made = streamed or Streamed()
    notices = list(made.notices)
    by_url: dict[str, list[PgTarget]] = {}
    for target in targets:
        if target.env.pg_grants and target.env.name not in made.envs:
            by_url.setdefault(target.url(), []).append(target)
    for group in by_url.values():
        try:
            conn = connect(group[0])
        except MomentryError as exc:
            notices.append(("", f"postgres: grants not managed: {exc}"))
            continue
        with conn:
            notices += _ensure_group(conn, group, everyone, changed, scopes, made.envs)
    order = {t.env.name: i for i, t in enumerate(targets)}
    return [notice for _, notice in sorted(notices, key=lambda named: order.get(named[0], -1))]


@dataclass
class Streamed:
    """What :class:`Alongside` made while the schemas ran: its notices, by environment, and the
    environments whose roles it made current."""

    notices: list[tuple[str, str]] = field(default_factory=list)
    envs: set[str] = field(default_factory=set)


class Alongside:
    """Grants made while a fan-out runs: each schema the lanes commit is handed over (``committed``),
    and a thread of its own grants them in batches of ``batch``, one ``ensure_grants`` each, on one
    connection per database, so the run's last step is left with one batch, not every environment.
    Towards the end of the ``total`` a batch takes at most half of what is left (never fewer than
    ``SMALLEST_BATCH``), so the last step waits for a small batch, not a full one.

    ``finish`` stops it and returns what the batches made (:class:`Streamed`). The targets handed
    over since the last batch are not granted here: the run's final ``ensure_grants`` takes them,
    told what was streamed. A batch that fails as a whole (the server went away) ends the
    streaming, and its targets are left to that final call.
    """

    #: Below twice this many schemas, every grant waits for the end of the run (one batch).
    SMALLEST_BATCH = 16

    @classmethod
    def for_run(cls, targets: Sequence[PgTarget],
                scopes: Callable[[], Scopes] = Scopes.of_models) -> Alongside | None:
        """One for a compiled run of ``targets``, when they are enough to leave more than one batch.
        ``scopes`` as for ``ensure_grants``: called here, not in the thread beside the lanes."""
        wanted = sum(1 for t in targets if t.env.pg_grants)
        if wanted < 2 * cls.SMALLEST_BATCH:
            return None
        return cls(max(cls.SMALLEST_BATCH, wanted // 8), scopes(), wanted)

    def __init__(self, batch: int, scopes: Scopes, total: int) -> None:
        import threading

        self.batch, self.scopes, self.left = batch, scopes, total
        self.ready: list[PgTarget] = []
        self.made = Streamed()
        self.closing = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._work, name="momentry-db grants", daemon=True)
        self.thread.start()

    def committed(self, target: PgTarget) -> None:
        """A lane committed ``target``'s schema: its grants may be made."""
        if target.env.pg_grants:
            with self.changed:
                self.ready.append(target)
                if len(self.ready) >= self._size():
                    self.changed.notify()

    def _size(self) -> int:
        """The next batch's size: ``batch``, or half of what is left near the end."""
        return max(self.SMALLEST_BATCH, min(self.batch, self.left // 2))

    def finish(self) -> Streamed:
        with self.changed:
            self.closing = True
            self.changed.notify()
        self.thread.join()
        return self.made

    def _work(self) -> None:
        conns: dict[str, Connection] = {}
        try:
            while True:
                with self.changed:
                    self.changed.wait_for(lambda: self.closing or len(self.ready) >= self._size())
                    if self.closing:
                        return
                    size = self._size()
                    batch, self.ready = self.ready[:size], self.ready[size:]
                    self.left -= len(batch)
                by_url: dict[str, list[PgTarget]] = {}
                for target in batch:
                    by_url.setdefault(target.url(), []).append(target)
                for url, group in by_url.items():
                    if url not in conns:
                        conns[url] = connect(group[0])
                    self.made.notices += _ensure_group(conns[url], group, (), {t.schema for t in group},
                                                       lambda: self.scopes)
                    self.made.envs.update(t.env.name for t in group)
        except Exception:  # noqa: BLE001 - what is not granted here, the run's final ensure_grants grants
            return
        finally:
            for conn in conns.values():
                conn.close()


def _ensure_group(conn: Connection, group: Sequence[PgTarget], everyone: Sequence[Environment],
                  changed: Collection[str], scopes: Callable[[], Scopes],
                  done: Collection[str] = ()) -> list[tuple[str, str]]:
    """``ensure_grants`` for the targets of one database: its notices, by environment."""
    from sqlalchemy.exc import DBAPIError

    others_of = {t.schema: [e for e in everyone if t.primary and not e.primary and e.pg_grants] for t in group}
    state: dict[tuple[str, str], str | None] = {}  # no shortcut: every environment's privileges are read
    if any(t.schema not in changed for t in group):  # the stamps matter only to a schema not just upgraded
        try:
            state = _grant_state(conn, [t.env for t in group] + [e for o in others_of.values() for e in o])
        except DBAPIError:
            pass
        conn.rollback()
    due = [(t.env, others_of[t.schema]) for t in group if t.schema in changed
           or state.get(("stamp", t.env.pg_role)) != _fingerprint(state, t.env, others_of[t.schema])]
    outcomes = _ensure(conn, due, scopes(), likely=any(env.schema in changed for env, _ in due),
                       done=done) if due else {}
    notices: list[tuple[str, str]] = []
    for env, _ in due:
        outcome = outcomes.get(env.name, "")
        if isinstance(outcome, Exception):
            reason = str(outcome.orig or outcome) if isinstance(outcome, DBAPIError) else str(outcome)
            reason = scrub(reason.strip().splitlines()[0], env.secrets())
            notices.append((env.name, f"postgres {env.name}: grants not managed ({reason}); "
                                      f"momentry-db verify --env {env.name} names what is missing"))
        elif outcome:
            notices.append((env.name, f"postgres {env.name}: role {env.pg_role}: {outcome}"))
    _stamp(conn, [(env, others) for env, others in due if not isinstance(outcomes.get(env.name), Exception)])
    return notices


def _ensure(conn: Connection, items: Sequence[tuple[Environment, Sequence[Environment]]], scopes: Scopes, *,
            likely: bool = False, done: Collection[str] = ()) -> dict[str, str | Exception]:
    """Write what each environment's role (and, from prod, the others' roles in public) lacks, in one
    transaction; by environment, what changed, or why its grants could not be managed.

    Unless a change is ``likely`` (a schema was just upgraded), a first read without the lock lets
    a no-op run write nothing. When the one transaction fails,
    each environment is tried on its own, so one refusal is that environment's alone."""
    import sqlalchemy as sa
    from sqlalchemy.exc import DBAPIError

    # a role made current by its own job (here, or earlier in the run: ``done``) needs no public-only one
    own = {env.name for env, _ in items} | set(done)
    jobs = [job for env, others in items
            for job in (_Job(env, env), *(_Job(o, env, True) for o in others if o.name not in own))]
    if not jobs:
        return {}
    if not likely:
        todo, public_create = _plan(conn, jobs, scopes)
        conn.rollback()
        if not todo and not public_create:
            return {}  # a no-op run: catalog reads only
    conn.execute(sa.text(_GRANTS_LOCK))
    todo, public_create = _plan(conn, jobs, scopes)  # again, under the lock: another run may have done part of it
    outcomes: dict[str, str | Exception] = {}
    if any(c.create_role for _, c in todo) and not _may_manage_roles(conn):
        user = _current_user(conn)
        for job, changes in todo:
            if changes.create_role:
                outcomes[job.owner.name] = RefusedError(
                    f"role {job.env.pg_role} does not exist and login {user} lacks CREATEROLE; create it "
                    f"(CREATE ROLE {job.env.pg_role} NOLOGIN) or migrate with a login that may")
        todo = [(job, changes) for job, changes in todo if job.owner.name not in outcomes]
    said: dict[str, list[str]] = {}
    statements: list[str] = []
    if public_create:
        first = next((env.name for env, _ in items if env.name not in outcomes), None)
        if first is not None:
            statements.append("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            said.setdefault(first, []).append("CREATE on schema public revoked from PUBLIC")
    statements += _statements([(job.env.pg_role, changes) for job, changes in todo])
    for job, changes in todo:
        part = ", ".join((["role created"] if changes.create_role else []) + (
            [f"{len(changes.grant)} privilege(s) granted"] if changes.grant else []) + (
            [f"{len(changes.revoke)} privilege(s) on public's isolated tables revoked"] if changes.revoke else []))
        said.setdefault(job.owner.name, []).append(
            part if not job.public_only else f"{job.env.pg_role} ({job.env.name}): {part}")
    try:
        if statements:
            conn.exec_driver_sql(";\n".join(statements))
        conn.commit()
    except DBAPIError as exc:
        conn.rollback()
        if len(items) == 1:
            return {items[0][0].name: exc}
        for item in items:  # each on its own: the failure is one environment's
            if item[0].name not in outcomes:
                outcomes.update(_ensure(conn, [item], scopes, likely=likely, done=done))
        return outcomes
    return {**outcomes, **{name: "; ".join(parts) for name, parts in said.items()}}


def _current_user(conn: Connection) -> str:
    import sqlalchemy as sa

    return str(conn.execute(sa.text("SELECT current_user")).scalar())


# --- logins: momentry-db grant --login NAME [--revoke] -----------------------------------------


@dataclass(frozen=True)
class LoginGrant:
    """What ``grant`` did for one login: its membership in the environment's role and its search_path."""

    env: str
    login: str
    role: str
    revoke: bool
    search_path: str | None  # the setting the login now has (None: not set)
    changed: tuple[str, ...]  # what this run changed; empty when it was already so

    def to_json(self) -> dict[str, Any]:
        return {"store": "postgres", "login": self.login, "role": self.role, "revoke": self.revoke,
                "search_path": self.search_path, "changed": list(self.changed)}


def _shown_path(path: Sequence[str]) -> str:
    return ", ".join(path)


def _setting(value: str | None) -> tuple[str, ...] | None:
    """A stored search_path setting as a list of schema names."""
    if value is None:
        return None
    return tuple(part.strip().strip('"') for part in value.split(",") if part.strip())


def grant_login(target: PgTarget, login: str, everyone: Sequence[Environment], *,
                revoke: bool = False) -> LoginGrant:
    """Make an existing login a member of the environment's role with the environment's search_path,
    or with ``revoke`` undo both. Every refusal comes before the first write."""
    import sqlalchemy as sa
    from psycopg import sql
    from sqlalchemy.exc import DBAPIError

    from ...environments import validate_role

    env = target.env
    validate_role(login, "login")
    roles = {e.pg_role: e for e in everyone}
    if login in roles:
        raise ConfigError(f"{login!r} is environment {roles[login].name}'s group role, not a login; "
                          "give the login the service connects with")
    path = search_path_for(env)
    with connect(target) as conn:
        if not _may_manage_roles(conn):
            raise RefusedError(f"login {_current_user(conn)} may not manage roles (it needs CREATEROLE or "
                               "superuser); run grant with a login that may")
        found = _role(conn, login)
        if found is None:
            raise ConfigError(f"login {login!r} does not exist; create it first (CREATE ROLE {login} LOGIN "
                              f"PASSWORD '...'), then run grant again")
        can_login, superuser = found
        if not can_login:
            raise ConfigError(f"role {login!r} cannot log in (NOLOGIN); give the login the service connects with")
        if superuser:
            raise RefusedError(f"login {login!r} is a superuser: no privilege binds it, so it cannot be "
                               "isolated; give the service a login without SUPERUSER")
        member = bool(conn.execute(sa.text(_DIRECT_MEMBER), {"r": env.pg_role, "m": login}).scalar())
        current = conn.execute(sa.text(_SEARCH_PATH), {"m": login}).scalar()
        changed: list[str] = []
        ident, role = sql.Identifier(login), sql.Identifier(env.pg_role)
        try:
            if revoke:
                if member:
                    conn.exec_driver_sql(sql.SQL("REVOKE {} FROM {}").format(role, ident).as_string(None))
                    changed.append(f"removed from role {env.pg_role}")
                if _setting(current) == path:
                    conn.exec_driver_sql(sql.SQL("ALTER ROLE {} RESET search_path").format(ident).as_string(None))
                    changed.append("search_path reset")
                    current = conn.execute(sa.text(_SEARCH_PATH), {"m": login}).scalar()
                conn.commit()
                return LoginGrant(env.name, login, env.pg_role, True, current, tuple(changed))
            for other in everyone:
                if other.name != env.name and _role(conn, other.pg_role) is not None and conn.execute(
                        sa.text(_HAS_ROLE), {"m": login, "r": other.pg_role}).scalar():
                    raise RefusedError(f"login {login!r} already belongs to environment {other.name}'s role "
                                       f"{other.pg_role}; one login serves one environment (revoke it there first: "
                                       f"momentry-db grant --env {other.name} --login {login} --revoke)")
            if not conn.execute(sa.text("SELECT to_regnamespace(:s) IS NOT NULL"), {"s": env.schema}).scalar():
                raise RefusedError(f"schema {env.schema} does not exist; run momentry-db migrate --env {env.name} "
                                   "first")
            conn.rollback()
            problem = _ensure(conn, [(env, ())], Scopes.of_models()).get(env.name)
            if isinstance(problem, Exception):
                raise problem
            if not member:
                conn.exec_driver_sql(sql.SQL("GRANT {} TO {}").format(role, ident).as_string(None))
                changed.append(f"added to role {env.pg_role}")
            if _setting(current) != path:
                conn.exec_driver_sql(sql.SQL("ALTER ROLE {} SET search_path = {}").format(
                    ident, sql.SQL(", ").join(sql.Identifier(s) for s in path)).as_string(None))
                changed.append(f"search_path set to {_shown_path(path)}")
            conn.commit()
        except DBAPIError as exc:
            conn.rollback()
            reason = str(exc.orig or exc).strip().splitlines()[0]
            raise RefusedError(f"postgres {env.name}: grant for login {login} refused by the server: "
                               f"{scrub(reason, env.secrets())}; nothing was changed") from None
    return LoginGrant(env.name, login, env.pg_role, False, _shown_path(path), tuple(changed))


# --- what verify reads ------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """The environment's role or one of its members, as verify names it."""

    name: str
    login: bool
    superuser: bool = False

    def __str__(self) -> str:
        return f"{'login' if self.login else 'role'} {self.name}"


@dataclass
class Privileges:
    """What verify found about one environment's role, its members and their settings."""

    role_exists: bool
    subjects: list[Subject] = field(default_factory=list)  # the role first, then its members
    missing: list[tuple[Subject, Privilege]] = field(default_factory=list)
    forbidden_held: list[tuple[Subject, Privilege]] = field(default_factory=list)
    search_paths: dict[str, str | None] = field(default_factory=dict)  # login -> its setting
    also_in: dict[str, list[str]] = field(default_factory=dict)  # login -> other environments it belongs to


def inspect(target: PgTarget, everyone: Sequence[Environment]) -> Privileges:
    """Read, without writing, what the environment's role and its members hold and how they are set."""
    import sqlalchemy as sa

    env = target.env
    with connect(target) as conn:
        if _role(conn, env.pg_role) is None:
            return Privileges(False)
        relations = _relations(conn, {env.schema, PRIMARY_SCHEMA})
        found = Privileges(True, [Subject(env.pg_role, False)])
        found.subjects += [Subject(n, bool(login), bool(su))
                           for n, login, su in conn.execute(sa.text(_MEMBERS), {"r": env.pg_role})]
        scopes = Scopes.of_models()
        want, deny = wanted(env, relations, scopes), forbidden(env, relations, scopes)
        if not env.primary:
            skip = ["pg_catalog", "information_schema", env.schema]
            deny += [Privilege("function", nsp, oid, "EXECUTE", f"function {shown} (SECURITY DEFINER)")
                     for nsp, oid, shown in conn.execute(sa.text(_DEFINER_FUNCTIONS), {"skip": skip})]
        for subject in found.subjects:
            if subject.superuser:
                continue  # named on its own: every privilege check passes for a superuser
            found.missing += [(subject, p) for p, held in zip(want, _held(conn, subject.name, want)) if not held]
            found.forbidden_held += [(subject, p) for p, held in zip(deny, _held(conn, subject.name, deny)) if held]
        others = {e.pg_role: e.name for e in everyone if e.name != env.name}
        for subject in found.subjects[1:]:
            if subject.login and not subject.superuser:
                found.search_paths[subject.name] = conn.execute(sa.text(_SEARCH_PATH), {"m": subject.name}).scalar()
                found.also_in[subject.name] = [
                    f"{name} ({role})" for role, name in others.items() if _role(conn, role) is not None
                    and conn.execute(sa.text(_HAS_ROLE),
                                     {"m": subject.name, "r": role}).scalar()]
        conn.rollback()
    return found


def verify_problems(env: Environment, found: Privileges) -> dict[str, list[str]]:
    """verify's checks from what ``inspect`` read: check name -> the violations, each naming the role or
    login, the object and the privilege."""
    role = env.pg_role
    checks: dict[str, list[str]] = {}
    if not env.primary:
        checks[f"{role} and its members hold nothing on public's isolated tables"] = [
            f"{s}: {p}" for s, p in found.forbidden_held] + [
            f"{s} is a superuser: no privilege binds it" for s in found.subjects if s.superuser]
    where = f"schema {env.schema}" + ("" if env.primary else " and the shared tables in public")
    checks[f"{role} and its members can use {where}"] = [f"{s}: missing {p}" for s, p in found.missing]
    path = _shown_path(search_path_for(env))
    checks[f"members of {role} have search_path {path}"] = [
        f"login {login}: search_path is " + (f"{value!r}" if value is not None else "not set") + f", not {path!r}"
        for login, value in found.search_paths.items() if _setting(value) != search_path_for(env)]
    checks["no login belongs to two environments' roles"] = [
        f"login {login} belongs to {role} ({env.name}) and to {', '.join(others)}"
        for login, others in found.also_in.items() if others]
    return checks

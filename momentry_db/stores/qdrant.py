"""Qdrant: declared collection specs applied per environment.

Each environment's collection is an alias (``momentry_dev_rule1``) pointing at a
physical collection (``momentry_dev_rule1__<fingerprint>``), so that an immutable
change can be made on a new collection and swapped in atomically. A missing
collection is created; a mutable difference (HNSW, optimizers, payload indexes) is
updated in place; an immutable one (size, distance) only on explicit request. The
applied spec's fingerprint is kept in the collection's metadata.
"""

from __future__ import annotations

import hashlib
import json
import time
import tomllib
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..environments import QDRANT_LOGICAL_COLLECTION, Environment, names_clash, scrub, validate_collection
from ..errors import (ConfigError, LockTimeoutError, MomentryError, RefusedError, StoreError,
                      StoreUnreachableError)
from ..locks import HeldLock
from ..plan import Step, TargetPlan

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

STORE = "qdrant"
SPECS_DIR = Path(__file__).resolve().parents[2] / "qdrant_specs"
TIMEOUT_S = 5
COPY_BATCH = 256
METADATA_KEY = "momentry"
FILL_KEY = "momentry_fill"  # on a collection built by a recreate: {"from": source, "complete": bool}
NOT_CHECKABLE = "hnsw, optimizers and payload indexes: not checkable here (local mode ignores them)"

DISTANCES = ("Cosine", "Dot", "Euclid", "Manhattan")
PAYLOAD_TYPES = ("keyword", "integer", "float", "bool", "geo", "text", "datetime", "uuid")
HNSW_FIELDS = {"m": int, "ef_construct": int, "full_scan_threshold": int,
               "max_indexing_threads": int, "on_disk": bool, "payload_m": int}
OPTIMIZER_FIELDS = {"deleted_threshold": float, "vacuum_min_vector_number": int,
                    "default_segment_number": int, "max_segment_size": int, "memmap_threshold": int,
                    "indexing_threshold": int, "flush_interval_sec": int,
                    "max_optimization_threads": int}
# The ranges Qdrant itself validates (its HnswConfigDiff and OptimizersConfigDiff); every
# other number is a count or a size that cannot be negative. TOML integers stop at 2**63 - 1.
RANGES: dict[str, tuple[float, float | None]] = {
    "hnsw.ef_construct": (4, None), "hnsw.full_scan_threshold": (10, None),
    "optimizers.deleted_threshold": (0.0, 1.0), "optimizers.vacuum_min_vector_number": (100, None),
    "optimizers.max_segment_size": (1, None),
}


# --- specs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectionSpec:
    """One declared logical collection."""

    name: str
    size: int
    distance: str
    hnsw: tuple[tuple[str, Any], ...] = ()
    optimizers: tuple[tuple[str, Any], ...] = ()
    payload_indexes: tuple[tuple[str, str], ...] = ()
    source: str = field(default="", compare=False)

    def fingerprint(self) -> str:
        """A short hash of everything the spec declares (not where it came from)."""
        return _fingerprint(self)


@lru_cache(maxsize=None)
def _fingerprint(spec: CollectionSpec) -> str:
    data = {k: v for k, v in asdict(spec).items() if k != "source"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def load_specs(directory: Path = SPECS_DIR) -> list[CollectionSpec]:
    """Read and check every ``*.toml`` spec; a bad one names its file and field."""
    specs = [parse_spec(path) for path in sorted(directory.glob("*.toml"))]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(f"{spec.source}: collection {spec.name!r} is also declared in {seen[spec.name]}")
        seen[spec.name] = spec.source
    return specs


def check_spec_names(specs: list[CollectionSpec], envs: Sequence[Environment]) -> None:
    """Refuse specs that would give one environment a collection that is (or shadows) another's.

    A spec named ``dev_rule1`` gives prod ``momentry_dev_rule1``, which is dev's: prod's
    migrate would then change dev's collection. Each environment's own QDRANT_COLLECTION
    counts even when no spec declares ``rule1``; an overlap of two of those settings alone
    is not a spec's doing, and verify reports it.
    """
    owned: list[tuple[Environment, str, str, str]] = []  # env, logical name, where declared, collection
    for env in envs:
        names = {QDRANT_LOGICAL_COLLECTION: "its QDRANT_COLLECTION"}
        names.update({spec.name: spec.source or spec.name for spec in specs})
        owned += [(env, logical, source, env.qdrant_collection_for(logical)) for logical, source in names.items()]
    for i, mine in enumerate(owned):
        for theirs in owned[:i]:
            if mine[1] == theirs[1] == QDRANT_LOGICAL_COLLECTION:
                continue  # two environments' own QDRANT_COLLECTION settings: verify reports that overlap
            if not names_clash("Qdrant collection", mine[3], theirs[3]):
                continue
            if mine[1] == QDRANT_LOGICAL_COLLECTION:  # name the other spec: the environment's own name is fixed
                mine, theirs = theirs, mine
            (env, _, source, name), (other_env, _, other_source, other) = mine, theirs
            raise ConfigError(f"qdrant specs: {source} gives {env.name} the collection {name!r}, which "
                              f"clashes with {other_env.name}'s {other!r} ({other_source}); rename the "
                              "spec so that every environment keeps its own collections")


def parse_spec(path: Path) -> CollectionSpec:
    where = f"{path.parent.name}/{path.name}"
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not valid TOML ({exc})") from None

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {problem}")

    def table(key: str, required: bool) -> dict[str, Any]:
        value = data.get(key, None if required else {})
        if value is None:
            raise fail(key, "missing")
        if not isinstance(value, dict):
            raise fail(key, "must be a table")
        return value

    def typed(section: str, values: dict[str, Any], fields: dict[str, type]) -> tuple[tuple[str, Any], ...]:
        out = []
        for key, value in values.items():
            if key not in fields:
                raise fail(f"{section}.{key}", f"unknown field; known: {', '.join(fields)}")
            expected = fields[key]
            ok = isinstance(value, bool) if expected is bool else (
                isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float
                else isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise fail(f"{section}.{key}", f"must be {expected.__name__}, not {type(value).__name__}")
            if expected is not bool:
                low, high = RANGES.get(f"{section}.{key}", (0, None))
                if value < low or (high is not None and value > high):
                    shown = f"from {low} to {high}" if high is not None else f"{low} or more"
                    raise fail(f"{section}.{key}", f"must be {shown}, not {value}")
            out.append((key, float(value) if expected is float else value))
        return tuple(sorted(out))

    unknown = set(data) - {"name", "vectors", "hnsw", "optimizers", "payload_indexes"}
    if unknown:
        raise fail(sorted(unknown)[0], "unknown field; known: name, vectors, hnsw, optimizers, payload_indexes")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise fail("name", "must be a non-empty string")
    try:
        validate_collection(name)
    except ConfigError as exc:
        raise fail("name", str(exc)) from None
    if "__" in name:
        raise fail("name", "may not contain '__', which marks an alias's physical collections")
    vectors = table("vectors", required=True)
    extra = set(vectors) - {"size", "distance"}
    if extra:
        raise fail(f"vectors.{sorted(extra)[0]}", "unknown field; known: size, distance")
    size = vectors.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 65536:
        raise fail("vectors.size", "must be an integer from 1 to 65536")
    distance = vectors.get("distance")
    if distance not in DISTANCES:
        raise fail("vectors.distance", f"must be one of {', '.join(DISTANCES)}")
    indexes = []
    for key, value in table("payload_indexes", required=False).items():
        if value not in PAYLOAD_TYPES:
            raise fail(f"payload_indexes.{key}", f"must be one of {', '.join(PAYLOAD_TYPES)}")
        indexes.append((key, value))
    return CollectionSpec(
        name=name, size=size, distance=distance,
        hnsw=typed("hnsw", table("hnsw", required=False), HNSW_FIELDS),
        optimizers=typed("optimizers", table("optimizers", required=False), OPTIMIZER_FIELDS),
        payload_indexes=tuple(sorted(indexes)), source=where)


# --- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class QdrantTarget:
    """One environment's Qdrant: a server (QDRANT_URL) or the embedded local mode."""

    env: Environment
    client: QdrantClient | None = None  # injected by tests
    lock_timeout: float = 30.0  # local mode: how long to wait for another run's storage lock

    def bound(self, client: QdrantClient) -> QdrantTarget:
        """This target on an open client: one connection (and one local-mode lock) for several calls."""
        import dataclasses

        return dataclasses.replace(self, client=client)

    @property
    def local(self) -> bool:
        return self.env.qdrant_url is None

    @property
    def where(self) -> str:
        if self.env.qdrant_url is not None:
            return self.env.qdrant_url.masked
        return f"local mode at {self.env.state_dir / 'qdrant'}"

    @contextmanager
    def session(self) -> Iterator[QdrantClient]:
        """A connected client; local mode's file lock is released on exit."""
        if self.client is not None:
            yield self.client
            return
        if self.local:
            with self._local_lock():
                client = self._connect()
                try:
                    yield client
                finally:
                    client.close()
            return
        client = self._connect()
        try:
            yield client
        finally:
            client.close()

    @contextmanager
    def _local_lock(self) -> Iterator[None]:
        """One run at a time on the local storage, taken before qdrant-client first touches it."""
        import fcntl

        path = self.env.state_dir / "qdrant"
        path.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout
        with open(self.env.state_dir / "qdrant.lock", "a+") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        waited = f" for over {self.lock_timeout:g}s" if self.lock_timeout else ""
                        raise LockTimeoutError(f"qdrant: local storage {path} stayed in use by another run"
                                               f"{waited}; retry when it finishes") from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _connect(self) -> QdrantClient:
        from qdrant_client import QdrantClient

        secrets = self.env.secrets()
        if self.env.qdrant_url is None:
            try:
                return QdrantClient(path=str(self.env.state_dir / "qdrant"))
            except RuntimeError as exc:  # held by a client outside momentry-db
                raise StoreError(STORE, self.env.name, "open local storage", str(exc)) from None
        api_key = self.env.qdrant_api_key.reveal() if self.env.qdrant_api_key else None
        with warnings.catch_warnings():  # plain-http API keys are reported as a notice instead
            warnings.simplefilter("ignore")
            client = QdrantClient(url=self.env.qdrant_url.reveal(), api_key=api_key, timeout=TIMEOUT_S,
                                  check_compatibility=False)  # a second request, and a second timeout
        try:
            client.get_collections()
        except Exception as exc:
            client.close()
            status = getattr(exc, "status_code", None)
            if status in (401, 403):
                raise StoreUnreachableError(f"qdrant: {self.where} refused the request ({status}); "
                                            "check QDRANT_API_KEY") from None
            reason = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                           secrets)
            raise StoreUnreachableError(f"qdrant: cannot reach {self.where}: {reason}") from None
        return client

    @property
    def key_over_plain_http(self) -> bool:
        url = self.env.qdrant_url
        return self.env.qdrant_api_key is not None and url is not None and url.value.startswith("http://")


# --- plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One change to one collection."""

    kind: str  # create | update_hnsw | update_optimizers | create_index | delete_index | record | recreate
    collection: str
    detail: str = ""
    params: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class CollectionPlan:
    spec: CollectionSpec
    alias: str
    physical: str | None  # where the alias points now (None: missing)
    live_fingerprint: str | None
    actions: tuple[Action, ...]
    notes: tuple[str, ...] = ()

    @property
    def immutable(self) -> Action | None:
        return next((a for a in self.actions if a.kind == "recreate"), None)


def physical_name(alias: str, spec: CollectionSpec) -> str:
    return f"{alias}__{spec.fingerprint()[:8]}"


def resolve(client: QdrantClient, alias: str) -> str | None:
    """The physical collection behind a name: itself if it is a collection, else its alias target."""
    for item in client.get_aliases().aliases:
        if item.alias_name == alias:
            return str(item.collection_name)
    names = {c.name for c in client.get_collections().collections}
    return alias if alias in names else None


def plan_collection(client: QdrantClient, target: QdrantTarget, spec: CollectionSpec) -> CollectionPlan:
    alias = target.env.qdrant_collection_for(spec.name)
    physical = resolve(client, alias)
    if physical is None:
        create = Action("create", physical_name(alias, spec), f"{spec.size} dims, {spec.distance}, alias {alias}")
        return CollectionPlan(spec, alias, None, None, (create,))
    info = client.get_collection(physical)
    meta = (info.config.metadata or {}).get(METADATA_KEY) or {}
    live_fp = meta.get("fingerprint") if isinstance(meta, dict) else None
    actions: list[Action] = []
    notes: list[str] = []
    live_size, live_distance = _vectors(info)
    if (live_size, live_distance) != (spec.size, spec.distance):
        recreate = _recreate_action(client, alias, physical, spec, live_size, live_distance)
        return CollectionPlan(spec, alias, physical, live_fp, (recreate,))
    if target.local:
        notes.append(NOT_CHECKABLE)
    else:
        actions.extend(_mutable_actions(info, physical, spec))
    if live_fp != spec.fingerprint():
        actions.append(Action("record", physical, f"fingerprint {live_fp or 'none'} -> {spec.fingerprint()}"))
    return CollectionPlan(spec, alias, physical, live_fp, tuple(actions), tuple(notes))


def _points(client: QdrantClient, name: str) -> int:
    return int(client.count(name, exact=True).count)


def _vectors(info: Any) -> tuple[Any, Any]:
    vectors = info.config.params.vectors
    return getattr(vectors, "size", None), getattr(getattr(vectors, "distance", None), "value", None)


def _fill_state(info: Any) -> dict[str, Any]:
    """How a collection built by a recreate was filled: its source and whether the copy finished."""
    fill = (info.config.metadata or {}).get(FILL_KEY)
    return fill if isinstance(fill, dict) else {}


def _recreate_action(client: QdrantClient, alias: str, physical: str, spec: CollectionSpec,
                     live_size: Any, live_distance: Any) -> Action:
    """The immutable change: which collection the alias will point at, and what becomes of the old one.

    The new collection is named after the spec, so going back to an earlier spec finds the
    collection that spec had, points and all: it is reused, never deleted and rebuilt.
    """
    new = physical_name(alias, spec)
    source_points = _points(client, physical)
    copy = live_size == spec.size  # vectors of another size cannot be carried over
    params: dict[str, Any] = {"copy": copy}
    if physical == alias:
        params["conflict"] = (f"qdrant: {alias} is a plain collection, not an alias, so it cannot be swapped "
                              "atomically; migrate its points to an aliased collection first")
    if client.collection_exists(new):
        info = client.get_collection(new)
        if _vectors(info) != (spec.size, spec.distance):
            size, distance = _vectors(info)
            params["conflict"] = (f"qdrant: {new} already exists with vectors {size} {distance}, not the spec's "
                                  f"{spec.size} {spec.distance}; rename or remove it (momentry-db prune lists it)")
        state = "an interrupted copy" if _fill_state(info).get("complete") is False else "kept from earlier"
        where = f"alias {alias} -> {new} ({state}, {_points(client, new)} points"
    else:
        where = f"alias {alias} -> {new} (new"
    if copy:
        what = f"; the {source_points} points of {physical} are copied into it)"
    else:
        what = f"; vectors of {physical} are {live_size} wide, so its {source_points} points are not copied)"
    detail = (f"vectors {live_size} {live_distance} -> {spec.size} {spec.distance}; {where}{what}; "
              f"{physical} ({source_points} points) is kept")
    return Action("recreate", new, detail, tuple(sorted(params.items())))


def _mutable_actions(info: Any, physical: str, spec: CollectionSpec) -> list[Action]:
    actions: list[Action] = []
    for kind, declared, live in (("update_hnsw", spec.hnsw, info.config.hnsw_config),
                                 ("update_optimizers", spec.optimizers, info.config.optimizer_config)):
        changed = tuple((k, v) for k, v in declared if getattr(live, k, None) != v)
        if changed:
            detail = ", ".join(f"{k} {getattr(live, k, None)} -> {v}" for k, v in changed)
            actions.append(Action(kind, physical, detail, changed))
    # PayloadSchemaType's str() is its value, "keyword", as the spec writes it
    live_indexes = {name: str(i.data_type) for name, i in (info.payload_schema or {}).items()}
    declared = dict(spec.payload_indexes)
    for name, schema in declared.items():
        if live_indexes.get(name) != schema:
            if name in live_indexes:
                actions.append(Action("delete_index", physical, f"{name} ({live_indexes[name]})", (("field", name),)))
            actions.append(Action("create_index", physical, f"{name} ({schema})",
                                  (("field", name), ("schema", schema))))
    for name in sorted(set(live_indexes) - set(declared)):
        actions.append(Action("delete_index", physical, f"{name} ({live_indexes[name]})", (("field", name),)))
    return actions


def plan(target: QdrantTarget, specs: list[CollectionSpec] | None = None) -> list[TargetPlan]:
    """One TargetPlan per declared collection of this environment (read only)."""
    specs = load_specs() if specs is None else specs
    with target.session() as client:
        return [_target_plan(target, plan_collection(client, target, spec)) for spec in specs]


STAMP = "qdrant-applied.json"


def storage_mark(target: QdrantTarget) -> list[int] | None:
    """What tells a change to local storage: its meta.json's modification time and size (None: no storage)."""
    try:
        meta = (target.env.state_dir / "qdrant" / "meta.json").stat()
    except OSError:
        return None
    return [meta.st_mtime_ns, meta.st_size]


def _read_stamp(target: QdrantTarget) -> dict[str, Any]:
    try:
        stamp = json.loads((target.env.state_dir / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(stamp, dict) or not isinstance(stamp.get("fingerprints"), dict):
        return {}  # not one this version wrote: a full look, and a new stamp
    return stamp


def cached_plans(target: QdrantTarget, specs: list[CollectionSpec]) -> list[TargetPlan] | None:
    """Local mode's no-op answer without opening the storage (or importing qdrant-client).

    Valid only while the local storage's meta.json is exactly as momentry-db last left
    it and every spec's fingerprint matches what was applied; otherwise None.
    """
    if not target.local or target.client is not None:
        return None
    stamp = _read_stamp(target)
    if not stamp or stamp.get("meta") != storage_mark(target):
        return None
    applied = stamp.get("fingerprints", {})
    plans = []
    for spec in specs:
        alias = target.env.qdrant_collection_for(spec.name)
        if applied.get(alias) != spec.fingerprint():
            return None
        plans.append(TargetPlan(STORE, target.env.name, alias, (spec.fingerprint(),), (spec.fingerprint(),),
                                notes=(NOT_CHECKABLE,)))
    return plans


def write_stamp(target: QdrantTarget, specs: list[CollectionSpec], before: list[int] | None) -> None:
    """Remember, for local mode, that this environment's collections match these specs; called
    while the storage is still locked, with ``before`` the storage's mark when the run opened it.

    Other environments' entries are kept only when nothing but this run changed the storage since
    they were written (the stamp's mark is ``before``): a run touches only its own collections.
    """
    if not target.local:
        return
    stamp = _read_stamp(target)
    kept = stamp.get("fingerprints", {}) if stamp.get("meta") == before else {}
    fingerprints = {**kept, **{target.env.qdrant_collection_for(s.name): s.fingerprint() for s in specs}}
    path = target.env.state_dir / STAMP
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps({"meta": storage_mark(target), "fingerprints": fingerprints}))
    scratch.replace(path)  # whole or not at all, whatever stops this process


def _target_plan(target: QdrantTarget, cp: CollectionPlan) -> TargetPlan:
    steps = tuple(Step(STORE, target.env.name, cp.alias, a.kind, f"{a.collection}: {a.detail}".rstrip(": "))
                  for a in cp.actions)
    notes = list(cp.notes)
    if cp.immutable:
        notes.append("immutable change: refused unless --recreate-qdrant is given")
    return TargetPlan(STORE, target.env.name, cp.alias,
                      (cp.live_fingerprint,) if cp.live_fingerprint else (),
                      (cp.spec.fingerprint(),), steps, notes=tuple(notes))


# --- apply -----------------------------------------------------------------------------------


Emit = Callable[[str, Any], None]


LOCK_TTL_S = 600
HISTORY_KEY = "momentry_history"
HISTORY_KEPT = 50


@contextmanager
def apply_lock(client: QdrantClient, target: QdrantTarget, alias: str) -> Iterator[None]:
    """Serialize applies per collection across processes.

    Local mode already admits one client at a time. On a server, the lock is a tiny
    collection ``<alias>__lock``: creating a collection that exists fails, so only
    one run holds it; its metadata names the holder and when it expires.
    """
    if target.local:
        yield
        return
    import os
    import socket

    m = _models()
    name = f"{alias}__lock"
    owner = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + target.lock_timeout
    while True:
        try:
            client.create_collection(name, vectors_config=m.VectorParams(size=1, distance=m.Distance.DOT),
                                     metadata={"momentry_lock": {"owner": owner,
                                                                 "expires_at": time.time() + LOCK_TTL_S}})
            break
        except Exception:
            if not client.collection_exists(name):
                raise
            held = (client.get_collection(name).config.metadata or {}).get("momentry_lock") or {}
            if float(held.get("expires_at", 0)) < time.time():  # a crashed run's lock
                client.delete_collection(name)
                continue
            if time.monotonic() >= deadline:
                raise LockTimeoutError(f"qdrant {target.env.name}: {alias} is being migrated by "
                                       f"{held.get('owner', 'another run')}; retry when it finishes") from None
            time.sleep(0.2)
    try:
        yield
    finally:
        client.delete_collection(name)


def _record(client: QdrantClient, collection: str, entry: dict[str, Any]) -> None:
    """Append a step to the collection's own history (kept in its metadata, newest last)."""
    meta = client.get_collection(collection).config.metadata or {}
    past = meta.get(HISTORY_KEY) if isinstance(meta.get(HISTORY_KEY), list) else []
    client.update_collection(collection, metadata={HISTORY_KEY: [*past, entry][-HISTORY_KEPT:]})


def history(client: QdrantClient, env: Environment, specs: list[CollectionSpec]) -> list[dict[str, Any]]:
    """Recorded steps of the environment's collections."""
    out: list[dict[str, Any]] = []
    for spec in specs:
        physical = resolve(client, env.qdrant_collection_for(spec.name))
        if physical is not None:
            meta = client.get_collection(physical).config.metadata or {}
            out.extend(e for e in meta.get(HISTORY_KEY, []) if isinstance(e, dict))
    return out


def apply(target: QdrantTarget, specs: list[CollectionSpec] | None = None, *, recreate: bool = False,
          emit: Emit | None = None) -> list[Step]:
    """Bring every declared collection of this environment to its spec."""
    specs = load_specs() if specs is None else specs
    done: list[Step] = []
    with target.session() as client, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # local mode warns that payload indexes have no effect
        plans = [plan_collection(client, target, spec) for spec in specs]
        _refuse_unsafe(target, plans, recreate)
        for cp in plans:
            if not cp.actions:
                continue
            with apply_lock(client, target, cp.alias):
                cp = plan_collection(client, target, cp.spec)  # again, under the lock
                for action in cp.actions:
                    done.append(_run_action(client, target, cp, action, emit))
    return done


def _refuse_unsafe(target: QdrantTarget, plans: list[CollectionPlan], recreate: bool) -> None:
    """Refuse an immutable change without consent, or a collection in the way of the new one."""
    refused = [cp for cp in plans if cp.immutable and not recreate]
    if refused:
        cp = refused[0]
        assert cp.immutable is not None
        raise RefusedError(f"qdrant {target.env.name}: {cp.alias} needs an immutable change "
                           f"({cp.immutable.detail}); run with --recreate-qdrant to build a new "
                           "collection and swap the alias")
    conflicts = [dict(cp.immutable.params)["conflict"] for cp in plans
                 if cp.immutable and "conflict" in dict(cp.immutable.params)]
    if conflicts:
        raise RefusedError(conflicts[0])


def check_apply(target: QdrantTarget, specs: list[CollectionSpec], *, recreate: bool) -> MomentryError | None:
    """Raise what apply would refuse, reading only, so a run can refuse before any store writes.

    An unchanged local store (its stamp still holds) needs no look. A store that cannot
    be opened is not a refusal: its error is returned, for the run to report as this
    store's failure without waiting on the server a second time.
    """
    if cached_plans(target, specs) is not None:
        return None
    try:
        with target.session() as client, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # local mode warns that payload indexes have no effect
            plans = [plan_collection(client, target, spec) for spec in specs]
    except (StoreUnreachableError, LockTimeoutError, StoreError) as exc:
        return exc
    _refuse_unsafe(target, plans, recreate)
    return None


def _run_action(client: QdrantClient, target: QdrantTarget, cp: CollectionPlan, action: Action,
                emit: Emit | None) -> Step:
    import datetime as dt

    step = Step(STORE, target.env.name, cp.alias, action.kind, f"{action.collection}: {action.detail}".rstrip(": "))
    started, clock = dt.datetime.now(dt.timezone.utc), time.monotonic()
    entry = {"recorded_at": started.isoformat(timespec="seconds"), "env": target.env.name, "store": STORE,
             "step": action.kind, "description": step.description}
    try:
        _apply_action(client, target, cp, action, emit)
    except (ConfigError, RefusedError):
        raise
    except Exception as exc:
        reason = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                       target.env.secrets())
        if cp.physical is not None:
            _record(client, cp.physical, {**entry, "duration_ms": int((time.monotonic() - clock) * 1000),
                                          "outcome": "failed", "error": reason})
        raise StoreError(STORE, f"{target.env.name} (collection {cp.alias})",
                         f"{action.kind} {action.collection}", reason) from None
    where = resolve(client, cp.alias) or action.collection
    _record(client, where, {**entry, "duration_ms": int((time.monotonic() - clock) * 1000), "outcome": "applied"})
    if emit is not None:
        emit("upgraded", step)
    return step


def _models() -> Any:
    from qdrant_client import models

    return models


def _create(client: QdrantClient, name: str, spec: CollectionSpec) -> None:
    m = _models()
    client.create_collection(
        name,
        vectors_config=m.VectorParams(size=spec.size, distance=m.Distance(spec.distance)),
        hnsw_config=m.HnswConfigDiff(**dict(spec.hnsw)) if spec.hnsw else None,
        optimizers_config=m.OptimizersConfigDiff(**dict(spec.optimizers)) if spec.optimizers else None,
        metadata=_metadata(spec),
    )
    for field_name, schema in spec.payload_indexes:
        client.create_payload_index(name, field_name, field_schema=m.PayloadSchemaType(schema))


def _metadata(spec: CollectionSpec) -> dict[str, Any]:
    return {METADATA_KEY: {"spec": spec.name, "fingerprint": spec.fingerprint()}}


def _apply_action(client: QdrantClient, target: QdrantTarget, cp: CollectionPlan, action: Action,
                  emit: Emit | None) -> None:
    m = _models()
    params = dict(action.params)
    if action.kind == "create":
        _create(client, action.collection, cp.spec)
        client.update_collection_aliases(change_aliases_operations=[
            m.CreateAliasOperation(create_alias=m.CreateAlias(collection_name=action.collection,
                                                              alias_name=cp.alias))])
    elif action.kind == "update_hnsw":
        client.update_collection(action.collection, hnsw_config=m.HnswConfigDiff(**params))
    elif action.kind == "update_optimizers":
        client.update_collection(action.collection, optimizers_config=m.OptimizersConfigDiff(**params))
    elif action.kind == "create_index":
        client.create_payload_index(action.collection, params["field"],
                                    field_schema=m.PayloadSchemaType(params["schema"]))
    elif action.kind == "delete_index":
        client.delete_payload_index(action.collection, params["field"])
    elif action.kind == "record":
        client.update_collection(action.collection, metadata=_metadata(cp.spec))
    elif action.kind == "recreate":
        _recreate(client, target, cp, action, emit)
    else:  # pragma: no cover - plan_collection makes only the kinds above
        raise AssertionError(action.kind)


def _recreate(client: QdrantClient, target: QdrantTarget, cp: CollectionPlan, action: Action,
              emit: Emit | None) -> None:
    """Fill the spec's collection (new, or kept from earlier), then swap the alias atomically.

    Nothing is deleted: a collection already there (an earlier spec's, or an interrupted
    copy) keeps its points and is topped up from the current one where the vector size
    allows; the collection the alias leaves is kept for ``momentry-db prune``.
    """
    m = _models()
    params = dict(action.params)
    if "conflict" in params:  # the plan was made again under the lock
        raise RefusedError(params["conflict"])
    assert cp.physical is not None
    new = action.collection
    reused = client.collection_exists(new)
    if reused:
        live = set(client.get_collection(new).payload_schema or {})
        for field_name, schema in cp.spec.payload_indexes:  # an interrupted create may lack some
            if field_name not in live:
                client.create_payload_index(new, field_name, field_schema=m.PayloadSchemaType(schema))
    else:
        _create(client, new, cp.spec)
    client.update_collection(new, metadata={FILL_KEY: {"from": cp.physical, "complete": False}})
    copied = 0
    if params.get("copy"):
        offset = None
        while True:
            records, offset = client.scroll(cp.physical, limit=COPY_BATCH, offset=offset,
                                            with_payload=True, with_vectors=True)
            if records:
                client.upsert(new, points=[m.PointStruct(id=r.id, vector=r.vector, payload=r.payload)
                                           for r in records], wait=True)
                copied += len(records)
                if emit is not None:
                    emit("progress", {"store": STORE, "collection": new, "copied": copied})
            if offset is None:
                break
    elif emit is not None:
        kept = f"{new} keeps its own {_points(client, new)} points" if reused else "re-embed them"
        emit("notice", f"qdrant: {cp.alias}: vector size changed; points were not copied ({kept})")
    client.update_collection(new, metadata={FILL_KEY: {"from": cp.physical, "complete": True, "copied": copied}})
    client.update_collection_aliases(change_aliases_operations=[
        m.DeleteAliasOperation(delete_alias=m.DeleteAlias(alias_name=cp.alias)),
        m.CreateAliasOperation(create_alias=m.CreateAlias(collection_name=new, alias_name=cp.alias)),
    ])
    if emit is not None:
        emit("notice", f"qdrant: {cp.alias} now points at {new} ({copied} points copied, {_points(client, new)} "
                       f"in all); the old collection {cp.physical} ({_points(client, cp.physical)} points) is "
                       f"kept: momentry-db prune --env {target.env.name} lists old collections and removes them")


# --- old physical collections: list, prune ----------------------------------------------------


@dataclass(frozen=True)
class OldCollection:
    """A physical collection of an environment's alias that the alias no longer points at."""

    alias: str
    name: str
    points: int
    vectors: str
    interrupted: bool  # a recreate's copy into it never finished

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def old_collections(client: QdrantClient, env: Environment,
                    specs: list[CollectionSpec]) -> tuple[dict[str, str | None], list[OldCollection]]:
    """Where each alias points now, and the environment's physical collections it does not point at.

    A missing alias lists nothing: which of its collections is current is then unknown.
    """
    import re

    names = sorted(c.name for c in client.get_collections().collections)
    live: dict[str, str | None] = {}
    old: list[OldCollection] = []
    for spec in specs:
        alias = env.qdrant_collection_for(spec.name)
        live[alias] = resolve(client, alias)
        if live[alias] is None:  # nothing says which collection is current: leave them all to migrate
            continue
        owned = re.compile(re.escape(alias) + r"__[0-9a-f]{8}")  # physical_name's shape, never a lock
        for name in names:
            if owned.fullmatch(name) and name != live[alias]:
                info = client.get_collection(name)
                size, distance = _vectors(info)
                old.append(OldCollection(alias, name, _points(client, name), f"{size} {distance}",
                                         _fill_state(info).get("complete") is False))
    return live, old


def prune(client: QdrantClient, target: QdrantTarget, listed: list[OldCollection]) -> tuple[list[str], list[str]]:
    """Delete the listed collections that, under each alias's lock, are still old and unchanged.

    Returns what was deleted and what was left because it changed since it was listed
    (the alias points at it again, or its point count moved).
    """
    deleted: list[str] = []
    changed: list[str] = []
    for alias in dict.fromkeys(o.alias for o in listed):
        with apply_lock(client, target, alias):
            live = resolve(client, alias)
            for old in (o for o in listed if o.alias == alias):
                if not client.collection_exists(old.name):
                    continue
                if live is None or old.name == live or _points(client, old.name) != old.points:
                    changed.append(old.name)
                    continue
                client.delete_collection(old.name)
                deleted.append(old.name)
    return deleted, changed


# --- environment management: reset, clone ----------------------------------------------------


def preflight_drop(target: QdrantTarget, specs: list[CollectionSpec]) -> None:
    """Check that drop would succeed now, without waiting or writing.

    The storage must open at once (local mode: no other run or client holds it; a
    server: it answers and accepts the key), and no live run may hold a collection's lock.
    """
    from dataclasses import replace

    with replace(target, lock_timeout=0.0).session() as client:
        names = {c.name for c in client.get_collections().collections}
        if target.local:
            return
        for spec in specs:
            lock = f"{target.env.qdrant_collection_for(spec.name)}__lock"
            if lock not in names:
                continue
            held = (client.get_collection(lock).config.metadata or {}).get("momentry_lock") or {}
            if float(held.get("expires_at", 0)) >= time.time():
                raise RefusedError(f"qdrant {target.env.name}: {lock[:-6]} is being migrated by "
                                   f"{held.get('owner', 'another run')}; retry when it finishes")


def drop(client: QdrantClient, env: Environment, specs: list[CollectionSpec]) -> list[str]:
    """Delete every physical collection behind the environment's aliases, and the aliases."""
    dropped = []
    names = {c.name for c in client.get_collections().collections}
    for spec in specs:
        alias = env.qdrant_collection_for(spec.name)
        owned = sorted(n for n in names if n == alias or n.startswith(f"{alias}__"))
        for name in owned:
            client.delete_collection(name)  # its aliases go with it
            dropped.append(name)
    return dropped


def clone_points(client: QdrantClient, source: Environment, dest: Environment, specs: list[CollectionSpec],
                 limit: int | None, emit: Emit | None = None) -> dict[str, int]:
    """Copy points between two environments' collections by scroll and upsert, in batches."""
    m = _models()
    counts: dict[str, int] = {}
    for spec in specs:
        src, dst = source.qdrant_collection_for(spec.name), dest.qdrant_collection_for(spec.name)
        if not client.collection_exists(src):
            counts[dst] = 0
            continue
        total = client.count(src, exact=True).count
        total = min(total, limit) if limit is not None else total
        copied, offset = 0, None
        while copied < total:
            records, offset = client.scroll(src, limit=min(COPY_BATCH, total - copied), offset=offset,
                                            with_payload=True, with_vectors=True)
            if not records:
                break
            client.upsert(dst, points=[m.PointStruct(id=r.id, vector=r.vector, payload=r.payload)
                                       for r in records], wait=True)
            copied += len(records)
            if emit is not None:
                emit("progress", {"store": STORE, "target": dst, "done": copied, "total": total})
            if offset is None:
                break
        counts[dst] = copied
    return counts


# --- unlock ----------------------------------------------------------------------------------


def held_locks(target: QdrantTarget, specs: list[CollectionSpec]) -> list[HeldLock]:
    """Who holds the environment's apply locks: the local storage's file lock, or a server's lock collections."""
    import datetime as dt

    if target.local and target.client is None:
        return _local_lock_holder(target)
    found = []
    with target.session() as client:
        for spec in specs:
            alias = target.env.qdrant_collection_for(spec.name)
            name = f"{alias}__lock"
            if not client.collection_exists(name):
                continue
            held = (client.get_collection(name).config.metadata or {}).get("momentry_lock") or {}
            expires = float(held.get("expires_at", 0))
            when = dt.datetime.fromtimestamp(expires, dt.timezone.utc).isoformat(timespec="seconds")
            state = "its lease ran out" if expires < time.time() else "its lease is live: that run may still be migrating"
            found.append(HeldLock(STORE, f"{target.env.name} (collection {alias})",
                                  f"{held.get('owner', 'an unknown run')} (lease until {when}); {state}",
                                  token=(name, held.get("owner"))))
    return found


def _local_lock_holder(target: QdrantTarget) -> list[HeldLock]:
    """Local mode's lock is a file lock, which ends with the process holding it."""
    import fcntl

    path = target.env.state_dir / "qdrant.lock"
    if not path.exists():
        return []
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return [HeldLock(STORE, f"{target.env.name} (local mode)", f"a live process using {path.parent / 'qdrant'}",
                             releasable=False,
                             why_not="a file lock ends with its process; wait for that run or stop it")]
        fcntl.flock(handle, fcntl.LOCK_UN)
    return []


def release_lock(target: QdrantTarget, lock: HeldLock) -> bool:
    """Delete the lock collection shown in ``lock`` (it holds no points), only if that holder still has it."""
    name, owner = lock.token
    with target.session() as client:
        if not client.collection_exists(name):
            return False
        held = (client.get_collection(name).config.metadata or {}).get("momentry_lock") or {}
        if held.get("owner") != owner:
            return False
        return bool(client.delete_collection(name))

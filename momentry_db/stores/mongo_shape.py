"""MongoDB shapes: the indexes and validators a database's collections have, recorded and compared.

Mongo migrations are imperative, so nothing declares what a database should look
like. The runner records the shape each applied migration leaves (one document per
migration in ``momentry_migrate_shape``, beside pymongo-migrate's state collection,
which stays as its CLI expects it), and ``check``/``verify`` compare the live
database with the shape recorded at its head.

A shape is ``{collection: {"indexes": {name: {"key": [[field, direction], ...], option: value}},
"validator": {"validator": doc, "validationLevel": ..., "validationAction": ...}}}``. What servers
add on their own is left out, so a freshly migrated database matches its record: the
``_id_`` index, the index version ``v``, ``ns``, ``background`` and the text/2dsphere
index versions. Validation level and action take the server defaults when unset, and
an empty validator is no validator. A collection with neither indexes nor a validator
has no shape (the application creates such collections by writing to them).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pymongo.database import Database

SHAPE_COLLECTION = "momentry_migrate_shape"
# Added by the server, never chosen by a migration.
_SERVER_INDEX_FIELDS = frozenset({"v", "ns", "name", "key", "background", "textIndexVersion",
                                  "2dsphereIndexVersion"})
_DEFAULT_LEVEL, _DEFAULT_ACTION = "strict", "error"


def _plain(value: Any) -> Any:
    """The value as JSON-shaped Python (dicts, lists, numbers), the same for a live and a recorded shape."""
    from bson import json_util

    options = json_util.RELAXED_JSON_OPTIONS
    return json.loads(json_util.dumps(value, json_options=options))


def live_shape(db: Database, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The shape of every collection in the database, except ``skip`` and system collections."""
    shape: dict[str, Any] = {}
    for info in db.list_collections():
        name = info["name"]
        if name in skip or name.startswith("system.") or info.get("type", "collection") != "collection":
            continue
        indexes = {}
        for index in db[name].list_indexes():
            if index["name"] == "_id_":
                continue
            spec = {"key": [[field, direction] for field, direction in index["key"].items()]}
            spec.update({k: v for k, v in index.items() if k not in _SERVER_INDEX_FIELDS})
            indexes[index["name"]] = spec
        entry: dict[str, Any] = {}
        if indexes:
            entry["indexes"] = indexes
        options = info.get("options", {})
        if options.get("validator"):
            entry["validator"] = {"validator": options["validator"],
                                  "validationLevel": options.get("validationLevel", _DEFAULT_LEVEL),
                                  "validationAction": options.get("validationAction", _DEFAULT_ACTION)}
        if entry:
            shape[name] = entry
    return _plain(shape)


def record(db: Database, migration: str, shape: dict[str, Any]) -> None:
    """Record the shape the migration left.

    Stored as extended JSON text: validators and filters hold ``$``-prefixed and dotted
    field names that not every server accepts as stored field names.
    """
    from bson import json_util

    db[SHAPE_COLLECTION].replace_one(
        {"_id": migration},
        {"_id": migration, "recorded_at": dt.datetime.now(dt.timezone.utc),
         "shape": json_util.dumps(shape, json_options=json_util.RELAXED_JSON_OPTIONS)},
        upsert=True)


def recorded(db: Database, migration: str) -> dict[str, Any] | None:
    """The shape recorded after ``migration``, or None when none was (applied before shapes were recorded)."""
    doc = db[SHAPE_COLLECTION].find_one({"_id": migration})
    return None if doc is None else json.loads(doc["shape"])


def drift_from_record(db: Database, head: str, skip: tuple[str, ...]) -> list[str] | None:
    """How the live database differs from the shape recorded at ``head``; None when none was recorded."""
    reference = recorded(db, head)
    if reference is None:
        return None
    return compare(reference, live_shape(db, skip), db.name, f"the shape recorded at {head}")


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    return json.dumps(value, separators=(", ", ": "))


def _key(spec: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{json.dumps(f)}: {_show(d)}" for f, d in spec["key"]) + "}"


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    """Where two documents first differ, as a dotted path (or "the top level")."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *(k for k in b if k not in a)]:
            if a.get(k, ...) != b.get(k, ...):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}.{i}" if path else str(i))
    return path or "the top level"


def compare(reference: dict[str, Any], live: dict[str, Any], database: str, ref: str) -> list[str]:
    """Each missing, extra or changed index or validator of ``live`` against ``reference``.

    Every entry names the database, the collection and the index; ``ref`` names the
    reference in the message ("the shape recorded at 0002_cache", "prod's momentry").
    """
    problems = []
    for coll in sorted(reference.keys() | live.keys()):
        ns = f"{database}.{coll}"
        theirs, mine = reference.get(coll, {}), live.get(coll, {})
        their_idx, my_idx = theirs.get("indexes", {}), mine.get("indexes", {})
        for name in sorted(their_idx.keys() | my_idx.keys()):
            if name not in my_idx:
                problems.append(f"{ns}: index {name} missing; {ref} has it (key {_key(their_idx[name])})")
            elif name not in their_idx:
                problems.append(f"{ns}: extra index {name} (key {_key(my_idx[name])}), not in {ref}")
            elif my_idx[name] != their_idx[name]:
                a, b = my_idx[name], their_idx[name]
                changes = [f"{opt} is {_key(a) if opt == 'key' else _show(a.get(opt))}, {ref} has "
                           f"{_key(b) if opt == 'key' else _show(b.get(opt))}"
                           for opt in ["key", *sorted((a.keys() | b.keys()) - {"key"})] if a.get(opt) != b.get(opt)]
                problems.append(f"{ns}: index {name} differs: {'; '.join(changes)}")
        their_val, my_val = theirs.get("validator"), mine.get("validator")
        if their_val == my_val:
            continue
        if my_val is None:
            problems.append(f"{ns}: validator missing; {ref} has one")
        elif their_val is None:
            problems.append(f"{ns}: extra validator, not in {ref}")
        else:
            if my_val["validator"] != their_val["validator"]:
                where = _first_difference(my_val["validator"], their_val["validator"])
                problems.append(f"{ns}: validator differs at {where} from {ref}")
            for opt in ("validationLevel", "validationAction"):
                if my_val[opt] != their_val[opt]:
                    problems.append(f"{ns}: {opt} is {my_val[opt]}, {ref} has {their_val[opt]}")
    return problems

"""Qdrant specs applied per environment, on qdrant-client's local mode (and a real server when given)."""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from qdrant_client import QdrantClient, models

from momentry_db import command
from momentry_db.errors import ConfigError, RefusedError
from momentry_db.settings import load_project
from momentry_db.stores import qdrant
from tests.helpers import REPO, add_points



@pytest.fixture
def client(tmp_path: Path) -> Iterator[QdrantClient]:
    c = QdrantClient(path=str(tmp_path / "qdrant"))
    yield c
    c.close()


@pytest.fixture
def proj(tmp_path: Path):
    return load_project(tmp_path, {"MOMENTRY_STATE_DIR": str(tmp_path / "state")})


def spec_file(directory: Path, text: str) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "rule1.toml").write_text(text)
    return directory


BASE = (REPO / "qdrant_specs" / "rule1.toml").read_text()


def specs_with(tmp_path: Path, old: str, new: str) -> list[qdrant.CollectionSpec]:
    assert old in BASE
    return qdrant.load_specs(spec_file(tmp_path / "specs", BASE.replace(old, new)))


def tgt(proj, env: str, client: QdrantClient) -> qdrant.QdrantTarget:
    return qdrant.QdrantTarget(proj.environment(env), client=client)


def test_the_declared_spec() -> None:
    (spec,) = qdrant.load_specs()
    assert (spec.name, spec.size, spec.distance) == ("rule1", 1024, "Cosine")
    assert dict(spec.payload_indexes)["video_id"] == "integer"


def test_create_then_idempotent_reapply(proj, client) -> None:
    t = tgt(proj, "dev", client)
    created = qdrant.apply(t)
    assert [s.name for s in created] == ["create"]
    info = client.get_collection("momentry_dev_rule1")
    assert (info.config.params.vectors.size, info.config.params.vectors.distance) == (1024, models.Distance.COSINE)
    (spec,) = qdrant.load_specs()
    assert info.config.metadata["momentry"]["fingerprint"] == spec.fingerprint()
    assert qdrant.apply(t) == []
    (plan,) = qdrant.plan(t)
    assert plan.pending == () and plan.current == plan.head
    assert qdrant.NOT_CHECKABLE in plan.notes


def test_a_mutable_change_is_applied_in_place(proj, client, tmp_path: Path) -> None:
    t = tgt(proj, "dev", client)
    qdrant.apply(t)
    before = client.get_aliases().aliases[0].collection_name
    add_points(client, "momentry_dev_rule1", 5)
    specs = specs_with(tmp_path, "m = 16", "m = 32")
    (plan,) = qdrant.plan(t, specs)
    assert [s.name for s in plan.pending] == ["record"]  # local mode cannot see hnsw; the fingerprint moved
    qdrant.apply(t, specs)
    assert client.get_aliases().aliases[0].collection_name == before  # same collection, no recreate
    assert client.count("momentry_dev_rule1").count == 5
    assert client.get_collection(before).config.metadata["momentry"]["fingerprint"] == specs[0].fingerprint()


def test_mutable_differences_on_a_server_become_in_place_updates() -> None:
    spec = qdrant.CollectionSpec("rule1", 1024, "Cosine", hnsw=(("ef_construct", 128), ("m", 16)),
                                 optimizers=(("indexing_threshold", 20000),),
                                 payload_indexes=(("processor", "keyword"), ("video_id", "integer")))
    live = models.CollectionInfo(
        status=models.CollectionStatus.GREEN, optimizer_status=models.OptimizersStatusOneOf.OK,
        segments_count=1, payload_schema={
            "video_id": models.PayloadIndexInfo(data_type=models.PayloadSchemaType.KEYWORD, points=0),
            "stale": models.PayloadIndexInfo(data_type=models.PayloadSchemaType.INTEGER, points=0)},
        config=models.CollectionConfig(
            params=models.CollectionParams(vectors=models.VectorParams(size=1024, distance=models.Distance.COSINE)),
            hnsw_config=models.HnswConfig(m=16, ef_construct=100, full_scan_threshold=10000),
            optimizer_config=models.OptimizersConfig(deleted_threshold=0.2, vacuum_min_vector_number=1000,
                                                     default_segment_number=0, indexing_threshold=10000,
                                                     flush_interval_sec=5),
            wal_config=models.WalConfig(wal_capacity_mb=32, wal_segments_ahead=0)))
    A = qdrant.Action
    assert qdrant._mutable_actions(live, "phys", spec) == [
        A("update_hnsw", "phys", "ef_construct 100 -> 128", (("ef_construct", 128),)),
        A("update_optimizers", "phys", "indexing_threshold 10000 -> 20000", (("indexing_threshold", 20000),)),
        A("create_index", "phys", "processor (keyword)", (("field", "processor"), ("schema", "keyword"))),
        A("delete_index", "phys", "video_id (keyword)", (("field", "video_id"),)),
        A("create_index", "phys", "video_id (integer)", (("field", "video_id"), ("schema", "integer"))),
        A("delete_index", "phys", "stale (integer)", (("field", "stale"),)),
    ]
    # and the other way: a live collection that matches the spec needs nothing
    same = live.model_copy(update={
        "payload_schema": {"processor": models.PayloadIndexInfo(data_type=models.PayloadSchemaType.KEYWORD, points=0),
                           "video_id": models.PayloadIndexInfo(data_type=models.PayloadSchemaType.INTEGER, points=0)},
        "config": live.config.model_copy(update={
            "hnsw_config": live.config.hnsw_config.model_copy(update={"ef_construct": 128}),
            "optimizer_config": live.config.optimizer_config.model_copy(update={"indexing_threshold": 20000})})})
    assert qdrant._mutable_actions(same, "phys", spec) == []


def test_an_immutable_change_is_refused_without_the_flag(proj, client, tmp_path: Path) -> None:
    t = tgt(proj, "dev", client)
    qdrant.apply(t)
    add_points(client, "momentry_dev_rule1", 3)
    specs = specs_with(tmp_path, "size = 1024", "size = 768")
    (plan,) = qdrant.plan(t, specs)
    assert [s.name for s in plan.pending] == ["recreate"]
    with pytest.raises(RefusedError, match="--recreate-qdrant"):
        qdrant.apply(t, specs)
    assert client.get_collection("momentry_dev_rule1").config.params.vectors.size == 1024
    assert client.count("momentry_dev_rule1").count == 3
    assert len(client.get_collections().collections) == 1


def test_the_alias_swap_keeps_the_logical_name_answering(proj, client, tmp_path: Path) -> None:
    t = tgt(proj, "dev", client)
    qdrant.apply(t)
    old = client.get_aliases().aliases[0].collection_name
    add_points(client, "momentry_dev_rule1", 600)  # more than one copy batch
    specs = specs_with(tmp_path, 'distance = "Cosine"', 'distance = "Dot"')
    seen: list[int] = []

    def probe(event: str, payload) -> None:  # runs between every step of the recreate
        seen.append(client.count("momentry_dev_rule1").count)

    applied = qdrant.apply(t, specs, recreate=True, emit=probe)
    assert [s.name for s in applied] == ["recreate"]
    assert seen == [600] * 5, seen  # every event of the recreate, the copy batches included
    info = client.get_collection("momentry_dev_rule1")
    assert info.config.params.vectors.distance == models.Distance.DOT
    assert client.count("momentry_dev_rule1").count == 600
    new = client.get_aliases().aliases[0].collection_name
    assert new != old and client.collection_exists(old)  # the old collection stays until asked
    assert qdrant.apply(t, specs) == []


def test_a_size_change_builds_an_empty_collection(proj, client, tmp_path: Path) -> None:
    t = tgt(proj, "dev", client)
    qdrant.apply(t)
    add_points(client, "momentry_dev_rule1", 4)
    notices = []
    qdrant.apply(t, specs_with(tmp_path, "size = 1024", "size = 8"), recreate=True,
                 emit=lambda e, p: notices.append(p) if e == "notice" else None)
    assert client.get_collection("momentry_dev_rule1").config.params.vectors.size == 8
    assert client.count("momentry_dev_rule1").count == 0
    assert any("points were not copied" in n for n in notices)


def test_a_dev_run_leaves_the_prod_collection_untouched(proj, client) -> None:
    qdrant.apply(tgt(proj, "prod", client))
    add_points(client, "momentry_rule1", 7)
    prod_before = client.get_collection("momentry_rule1")
    qdrant.apply(tgt(proj, "dev", client))
    aliases = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
    assert set(aliases) == {"momentry_rule1", "momentry_dev_rule1"}
    assert aliases["momentry_rule1"] != aliases["momentry_dev_rule1"]
    assert client.get_collection("momentry_rule1") == prod_before
    assert client.count("momentry_dev_rule1").count == 0


@pytest.mark.parametrize("old,new,message", [
    ('name = "rule1"', 'name = "rule1"\ncolour = 3', r"rule1.toml: colour: unknown field"),
    ("[hnsw]", "colour = 3\n[hnsw]", r"rule1.toml: vectors.colour: unknown field"),
    ("m = 16", 'm = "sixteen"', r"rule1.toml: hnsw.m: must be int, not str"),
    ("m = 16", "mm = 16", r"rule1.toml: hnsw.mm: unknown field"),
    ('distance = "Cosine"', 'distance = "cosine"', r"rule1.toml: vectors.distance: must be one of"),
    ("size = 1024", "size = 1024.5", r"rule1.toml: vectors.size: must be an integer"),
    ('video_id = "integer"', 'video_id = "int"', r"rule1.toml: payload_indexes.video_id: must be one of"),
    ('name = "rule1"', 'name = "Rule 1"', r"rule1.toml: name: invalid Qdrant collection name"),
])
def test_a_bad_spec_names_the_file_and_the_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        specs_with(tmp_path, old, new)


def test_a_bad_spec_stops_the_run_before_any_store_is_touched(project, database, tmp_path: Path) -> None:
    bad = spec_file(tmp_path / "bad", BASE.replace("m = 16", 'm = "x"'))
    proj = load_project(project.root, project.environ)
    with pytest.raises(ConfigError, match=r"rule1.toml: hnsw.m: must be int, not str"):
        command.migrate(proj, "dev", sources=command.Sources(qdrant_specs=bad))
    assert database.tables("dev") == set()
    assert not (Path(project.environ["MOMENTRY_STATE_DIR"]) / "qdrant").exists()


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).seen.append(dict(self.headers))
        self.send_response(401)
        self.end_headers()
        self.wfile.write(b'{"status": {"error": "Unauthorized"}}')

    def log_message(self, *args) -> None:
        pass


def test_api_key_is_sent_and_never_printed(project) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = project.momentry_db("--project-dir", str(project.root), "migrate", "--env", "dev",
                                     "--store", "qdrant",
                                     env={"QDRANT_URL": f"http://127.0.0.1:{server.server_port}",
                                          "QDRANT_API_KEY": "qk-very-secret-123"})
    finally:
        server.shutdown()
    assert result.code == 1
    assert _Recorder.seen and _Recorder.seen[0].get("api-key") == "qk-very-secret-123"
    assert "qk-very-secret-123" not in result.out + result.err
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: qdrant: http://127.0.0.1:{server.server_port} refused the request (401); "
                      "check QDRANT_API_KEY"]
    assert "Traceback" not in result.err and "Warning" not in result.err


def test_unreachable_qdrant_fails_in_one_line(project, silent_server) -> None:
    port, _ = silent_server
    result = project.momentry_db("--project-dir", str(project.root), "status", "--env", "dev",
                                 "--store", "qdrant", env={"QDRANT_URL": f"http://127.0.0.1:{port}"})
    assert result.code == 1
    lines = [x for x in result.err.splitlines() if x.strip()]
    assert lines == [f"error: qdrant: cannot reach http://127.0.0.1:{port}: timed out"]


def test_a_qdrant_server_is_asked_with_the_5_second_timeout(tmp_path: Path, monkeypatch) -> None:
    import qdrant_client

    class Built(Exception):
        pass

    given: dict = {}

    def client(**kwargs):
        given.update(kwargs)
        raise Built

    monkeypatch.setattr(qdrant_client, "QdrantClient", client)
    proj = load_project(tmp_path, {"QDRANT_URL": "http://127.0.0.1:1", "MOMENTRY_STATE_DIR": str(tmp_path / "state")})
    with pytest.raises(Built):
        qdrant.QdrantTarget(proj.environment("dev"))._connect()
    assert given["timeout"] == qdrant.TIMEOUT_S == 5


def test_a_silent_qdrant_is_waited_on_once_by_migrate(project, silent_server) -> None:
    """The up-front refusal check and the apply share one attempt: one timeout, not two."""
    port, accepted = silent_server
    result = project.cli("migrate", "--env", "dev", "--store", "qdrant",
                         env={"QDRANT_URL": f"http://127.0.0.1:{port}"})
    assert result.code == 1
    assert [x for x in result.err.splitlines() if x.startswith("error:")] == [
        f"error: qdrant: cannot reach http://127.0.0.1:{port}: timed out"]
    assert len(accepted) == 1


@pytest.mark.qdrant
def test_payload_indexes_and_hnsw_on_a_real_server(real_servers, tmp_path: Path) -> None:
    proj = load_project(tmp_path, {"QDRANT_URL": real_servers["QDRANT_URL"],
                                   "QDRANT_COLLECTION": f"momentry_test_{int(time.time() * 1000)}"})
    t = qdrant.QdrantTarget(proj.environment("dev"))
    with t.session() as c:
        t = t.bound(c)
        try:
            qdrant.apply(t)
            info = c.get_collection(t.env.qdrant_collection)
            assert set(info.payload_schema) == {"video_id", "chunk_id", "sequence", "video_uuid", "processor"}
            assert info.config.hnsw_config.ef_construct == 128
            assert qdrant.apply(t) == []
            specs = specs_with(tmp_path, "ef_construct = 128", "ef_construct = 200")
            assert [s.name for s in qdrant.apply(t, specs)] == ["update_hnsw", "record"]
            assert c.get_collection(t.env.qdrant_collection).config.hnsw_config.ef_construct == 200
        finally:
            for alias in c.get_aliases().aliases:
                if alias.alias_name == t.env.qdrant_collection:
                    c.delete_collection(alias.collection_name)


def test_the_local_no_op_answer_notices_changes_made_behind_its_back(project) -> None:
    first = project.cli("migrate", "--env", "dev", "--store", "qdrant", "--json")
    assert [s["name"] for s in json.loads(first.out)["applied"]] == ["create"]
    noop = project.cli("migrate", "--env", "dev", "--store", "qdrant", "--json")
    assert json.loads(noop.out)["applied"] == []
    path = str(Path(project.environ["MOMENTRY_STATE_DIR"]) / "qdrant")
    client = QdrantClient(path=path)
    for alias in client.get_aliases().aliases:
        client.delete_collection(alias.collection_name)
    client.close()
    status = project.cli("status", "--env", "dev", "--store", "qdrant")
    assert "1 pending: create" in status.out
    again = project.cli("migrate", "--env", "dev", "--store", "qdrant", "--json")
    assert [s["name"] for s in json.loads(again.out)["applied"]] == ["create"]


# --- nothing lost: rollback, leftovers, prune ---------------------------------------------------


def write_specs(project, text: str) -> None:
    """The project's own qdrant_specs/, which the CLI reads instead of the packaged ones."""
    spec_file(project.root / "qdrant_specs", text)


@contextmanager
def local_client(project) -> Iterator[QdrantClient]:
    """The project's local-mode storage, opened between CLI runs (one client at a time)."""
    c = QdrantClient(path=str(Path(project.environ["MOMENTRY_STATE_DIR"]) / "qdrant"))
    try:
        yield c
    finally:
        c.close()


def layout(project) -> tuple[dict[str, str], dict[str, int]]:
    """Every alias with its collection, and every collection with its point count."""
    with local_client(project) as c:
        aliases = {a.alias_name: a.collection_name for a in c.get_aliases().aliases}
        counts = {col.name: c.count(col.name, exact=True).count for col in c.get_collections().collections}
    return aliases, counts


def migrate_qdrant(project, env: str, *extra: str):
    return project.cli("migrate", "--env", env, "--store", "qdrant", *extra)


def test_going_back_to_a_kept_spec_repoints_the_alias_with_its_points(project) -> None:
    write_specs(project, BASE)
    assert migrate_qdrant(project, "prod").code == 0
    with local_client(project) as c:
        add_points(c, "momentry_rule1", 300)
    (first,) = layout(project)[0].values()

    write_specs(project, BASE.replace("size = 1024", "size = 768"))
    bigger = migrate_qdrant(project, "prod", "--recreate-qdrant")
    assert bigger.code == 0, bigger.err
    aliases, counts = layout(project)
    second = aliases["momentry_rule1"]
    assert counts == {first: 300, second: 0}
    assert f"the old collection {first} (300 points) is kept" in bigger.err
    assert "points were not copied (re-embed them)" in bigger.err

    write_specs(project, BASE)
    plan = project.cli("plan", "--env", "prod", "--store", "qdrant")
    assert plan.code == 0
    assert (f"alias momentry_rule1 -> {first} (kept from earlier, 300 points; "
            f"vectors of {second} are 768 wide, so its 0 points are not copied); "
            f"{second} (0 points) is kept") in plan.out
    assert layout(project) == (aliases, counts)  # plan wrote nothing

    back = migrate_qdrant(project, "prod", "--recreate-qdrant")
    assert back.code == 0, back.err
    assert f"points were not copied ({first} keeps its own 300 points)" in back.err
    assert layout(project) == ({"momentry_rule1": first}, {first: 300, second: 0})
    with local_client(project) as c:
        assert c.get_collection("momentry_rule1").config.params.vectors.size == 1024
        assert c.retrieve("momentry_rule1", [0, 299], with_payload=True)[1].payload == {"video_id": 299}
    assert migrate_qdrant(project, "prod").code == 0  # and it is now at its spec
    assert layout(project) == ({"momentry_rule1": first}, {first: 300, second: 0})


def test_an_interrupted_copy_is_resumed_and_keeps_points_the_source_lacks(project) -> None:
    write_specs(project, BASE)
    assert migrate_qdrant(project, "dev").code == 0
    with local_client(project) as c:
        add_points(c, "momentry_dev_rule1", 600)
    (source,) = layout(project)[0].values()
    dot = BASE.replace('distance = "Cosine"', 'distance = "Dot"')
    write_specs(project, dot)
    (spec,) = qdrant.load_specs(project.root / "qdrant_specs")
    leftover = qdrant.physical_name("momentry_dev_rule1", spec)
    with local_client(project) as c:  # a recreate that stopped after 100 points, plus one of its own
        qdrant._create(c, leftover, spec)
        c.update_collection(leftover, metadata={qdrant.FILL_KEY: {"from": source, "complete": False}})
        records, _ = c.scroll(source, limit=100, with_vectors=True, with_payload=True)
        c.upsert(leftover, points=[models.PointStruct(id=r.id, vector=r.vector, payload=r.payload) for r in records])
        c.upsert(leftover, points=[models.PointStruct(id=10_000, vector=[1.0] * 1024, payload={"video_id": -1})])

    plan = project.cli("plan", "--env", "dev", "--store", "qdrant")
    assert (f"alias momentry_dev_rule1 -> {leftover} (an interrupted copy, 101 points; "
            f"the 600 points of {source} are copied into it); {source} (600 points) is kept") in plan.out
    listed = project.cli("prune", "--env", "dev")
    assert f"qdrant dev: {leftover}: 1024 Dot, 101 points, an interrupted copy: old" in listed.out

    result = migrate_qdrant(project, "dev", "--recreate-qdrant")
    assert result.code == 0, result.err
    assert layout(project) == ({"momentry_dev_rule1": leftover}, {source: 600, leftover: 601})
    with local_client(project) as c:
        assert c.retrieve(leftover, [10_000], with_payload=True)[0].payload == {"video_id": -1}
        assert c.get_collection(leftover).config.metadata[qdrant.FILL_KEY] == {
            "from": source, "complete": True, "copied": 600}


def test_a_foreign_collection_in_the_new_collections_place_is_refused_before_any_write(project) -> None:
    write_specs(project, BASE)
    assert migrate_qdrant(project, "dev").code == 0
    dot = BASE.replace('distance = "Cosine"', 'distance = "Dot"')
    write_specs(project, dot)
    (spec,) = qdrant.load_specs(project.root / "qdrant_specs")
    squatter = qdrant.physical_name("momentry_dev_rule1", spec)
    with local_client(project) as c:
        c.create_collection(squatter, vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT))
        c.upsert(squatter, points=[models.PointStruct(id=1, vector=[1.0, 0, 0, 0])])
    before = layout(project)
    result = migrate_qdrant(project, "dev", "--recreate-qdrant")
    assert result.code == 2
    assert result.err.strip().splitlines()[-1] == (
        f"error: qdrant: {squatter} already exists with vectors 4 Dot, not the spec's 1024 Dot; "
        "rename or remove it (momentry-db prune lists it)")
    assert layout(project) == before


def test_a_same_size_roundtrip_reuses_the_kept_collection_and_carries_the_newer_points_back(project) -> None:
    write_specs(project, BASE)
    assert migrate_qdrant(project, "dev").code == 0
    with local_client(project) as c:
        add_points(c, "momentry_dev_rule1", 10)
    (cosine,) = layout(project)[0].values()
    write_specs(project, BASE.replace('distance = "Cosine"', 'distance = "Dot"'))
    assert migrate_qdrant(project, "dev", "--recreate-qdrant").code == 0
    with local_client(project) as c:  # written while Dot was live
        c.upsert("momentry_dev_rule1",
                 points=[models.PointStruct(id=50, vector=[2.0] * 1024, payload={"video_id": 50})])
    (dot,) = layout(project)[0].values()
    write_specs(project, BASE)
    assert migrate_qdrant(project, "dev", "--recreate-qdrant").code == 0
    assert layout(project) == ({"momentry_dev_rule1": cosine}, {cosine: 11, dot: 11})
    with local_client(project) as c:  # the same collection, not one rebuilt under its name
        steps = [e["step"] for e in c.get_collection(cosine).config.metadata[qdrant.HISTORY_KEY]]
    assert steps == ["create", "recreate"]


def old_and_live(project, env: str) -> tuple[str, str]:
    """Give env a kept collection: 5 points, then a size change that leaves them behind."""
    write_specs(project, BASE)
    assert migrate_qdrant(project, env).code == 0
    alias = "momentry_rule1" if env == "prod" else f"momentry_{env}_rule1"
    with local_client(project) as c:
        add_points(c, alias, 5)
    (old,) = (v for k, v in layout(project)[0].items() if k == alias)
    write_specs(project, BASE.replace("size = 1024", "size = 8"))
    assert migrate_qdrant(project, env, "--recreate-qdrant").code == 0
    return old, layout(project)[0][alias]


def test_prune_lists_old_collections_with_their_points_and_deletes_only_with_yes(project) -> None:
    prod_old, prod_live = old_and_live(project, "prod")
    dev_old, dev_live = old_and_live(project, "dev")
    before = layout(project)

    listed = project.cli("prune", "--env", "dev")
    assert listed.code == 0
    assert listed.out.splitlines() == [
        f"qdrant dev: momentry_dev_rule1 -> {dev_live}: live, kept",
        f"qdrant dev: {dev_old}: 1024 Cosine, 5 points: old",
        "prune dev: 1 old collection(s) holding 5 point(s); nothing deleted (rerun with --yes to delete them)",
    ]
    assert layout(project) == before

    pruned = project.cli("prune", "--env", "dev", "--yes", "--json")
    assert pruned.code == 0
    data = json.loads(pruned.out)
    assert (data["deleted"], data["live"]) == ([dev_old], {"momentry_dev_rule1": dev_live})
    aliases, counts = layout(project)
    assert aliases == before[0]
    assert counts == {k: v for k, v in before[1].items() if k != dev_old}  # prod's old one stays
    again = project.cli("prune", "--env", "dev", "--yes")
    assert again.out.splitlines()[-1] == "prune dev: no old collections; nothing to delete"


def test_prod_prune_needs_its_name_typed(project) -> None:
    old, live = old_and_live(project, "prod")
    before = layout(project)

    no_terminal = project.cli("prune", "--env", "prod", "--yes")
    assert no_terminal.code == 2
    assert no_terminal.err.strip().splitlines()[-1] == (
        "error: prune of prod needs a typed confirmation: type 'prod' when asked on a terminal, "
        "or pass --confirm prod; nothing was deleted")
    wrong = project.cli("prune", "--env", "prod", "--yes", "--confirm", "dev")
    assert wrong.code == 2
    assert wrong.err.strip().splitlines()[-1] == ("error: --confirm 'dev' does not match --env 'prod'; "
                                                  "nothing was deleted")
    assert layout(project) == before

    confirmed = project.cli("prune", "--env", "prod", "--yes", "--confirm", "prod")
    assert confirmed.code == 0, confirmed.err
    assert f"qdrant prod: {old}: 1024 Cosine, 5 points: deleted" in confirmed.out
    assert layout(project) == ({"momentry_rule1": live}, {live: 0})


def on_a_terminal(project, typed: str, *args: str) -> tuple[int, str]:
    """Run momentry-db as a subprocess whose stdin is a terminal, typing one line."""
    import os
    import pty
    import subprocess
    import sys

    main, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "momentry_db.cli", "--project-dir", str(project.root), *args],
                            stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=project.run_env(), cwd=project.root, text=True)
    os.close(follower)
    os.write(main, (typed + "\n").encode())
    out, err = proc.communicate(timeout=120)
    os.close(main)
    return proc.returncode, out + err


@pytest.mark.parametrize("typed,code", [("prod", 0), ("yes", 2)])
def test_prod_prune_on_a_terminal_deletes_only_when_prod_is_typed(project, typed: str, code: int) -> None:
    old, live = old_and_live(project, "prod")
    before = layout(project)
    returncode, output = on_a_terminal(project, typed, "prune", "--env", "prod", "--yes")
    assert returncode == code, output
    assert f"prune deletes 1 old Qdrant collection(s) of prod holding 5 point(s): {old}" in output
    assert layout(project) == (({"momentry_rule1": live}, {live: 0}) if code == 0 else before)


def test_a_spec_that_reaches_another_environments_collection_is_refused(project) -> None:
    write_specs(project, BASE)
    assert migrate_qdrant(project, "dev").code == 0
    with local_client(project) as c:
        add_points(c, "momentry_dev_rule1", 3)
    (project.root / "qdrant_specs" / "dev_rule1.toml").write_text(BASE.replace('name = "rule1"', 'name = "dev_rule1"'))
    before = layout(project)
    for command_line in (("migrate", "--env", "prod", "--store", "qdrant", "--recreate-qdrant"),
                         ("plan", "--env", "prod", "--store", "qdrant"),
                         ("migrate", "--env", "dev", "--store", "qdrant")):
        result = project.cli(*command_line)
        assert result.code == 2, command_line
        assert result.err.strip().splitlines()[-1] == (
            "error: qdrant specs: qdrant_specs/dev_rule1.toml gives prod the collection 'momentry_dev_rule1', "
            "which clashes with dev's 'momentry_dev_rule1' (qdrant_specs/rule1.toml); rename the spec so that "
            "every environment keeps its own collections")
    assert layout(project) == before


def test_a_spec_name_against_a_collection_no_spec_declares_is_refused(tmp_path: Path) -> None:
    proj = load_project(tmp_path, {"MOMENTRY_STATE_DIR": str(tmp_path / "state")})
    (spec,) = specs_with(tmp_path, 'name = "rule1"', 'name = "dev_rule1"')
    with pytest.raises(ConfigError, match="gives prod the collection 'momentry_dev_rule1', which clashes with "
                                          "dev's 'momentry_dev_rule1' \\(its QDRANT_COLLECTION\\)"):
        qdrant.check_spec_names([spec], proj.environments())
    qdrant.check_spec_names(qdrant.load_specs(), proj.environments())  # the shipped spec is fine


@pytest.mark.parametrize("old,new,message", [
    ("m = 16", "m = -16", "hnsw.m: must be 0 or more, not -16"),
    ("ef_construct = 128", "ef_construct = 3", "hnsw.ef_construct: must be 4 or more, not 3"),
    ("full_scan_threshold = 10000", "full_scan_threshold = 9", "hnsw.full_scan_threshold: must be 10 or more, not 9"),
    ("m = 16", "payload_m = -1", "hnsw.payload_m: must be 0 or more, not -1"),
    ("m = 16", "max_indexing_threads = -2", "hnsw.max_indexing_threads: must be 0 or more, not -2"),
    ("m = 16", "on_disk = 1", "hnsw.on_disk: must be bool, not int"),
    ("indexing_threshold = 20000", "deleted_threshold = 1.5",
     "optimizers.deleted_threshold: must be from 0.0 to 1.0, not 1.5"),
    ("indexing_threshold = 20000", "deleted_threshold = -0.1",
     "optimizers.deleted_threshold: must be from 0.0 to 1.0, not -0.1"),
    ("indexing_threshold = 20000", "vacuum_min_vector_number = 99",
     "optimizers.vacuum_min_vector_number: must be 100 or more, not 99"),
    ("indexing_threshold = 20000", "max_segment_size = 0",
     "optimizers.max_segment_size: must be 1 or more, not 0"),
    ("indexing_threshold = 20000", "indexing_threshold = -1",
     "optimizers.indexing_threshold: must be 0 or more, not -1"),
    ("indexing_threshold = 20000", "flush_interval_sec = -5",
     "optimizers.flush_interval_sec: must be 0 or more, not -5"),
    ("default_segment_number = 2", "default_segment_number = -2",
     "optimizers.default_segment_number: must be 0 or more, not -2"),
    ("size = 1024", "size = 0", "vectors.size: must be an integer from 1 to 65536"),
    ("size = 1024", "size = 65537", "vectors.size: must be an integer from 1 to 65536"),
    ('name = "rule1"', 'name = "rule1__a1b2c3d4"', "name: may not contain '__'"),
])
def test_numbers_out_of_qdrants_ranges_are_refused(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"rule1.toml: {re.escape(message)}"):
        specs_with(tmp_path, old, new)


def test_the_edges_of_qdrants_ranges_are_accepted(tmp_path: Path) -> None:
    edges = BASE.replace("m = 16", "m = 0\npayload_m = 0\nmax_indexing_threads = 0\non_disk = true").replace(
        "ef_construct = 128", "ef_construct = 4").replace("full_scan_threshold = 10000", "full_scan_threshold = 10")
    edges = edges.replace("indexing_threshold = 20000", "indexing_threshold = 0\ndeleted_threshold = 1\n"
                          "vacuum_min_vector_number = 100\nmax_segment_size = 1\nflush_interval_sec = 0")
    (spec,) = qdrant.load_specs(spec_file(tmp_path / "specs", edges))
    assert dict(spec.hnsw) == {"m": 0, "payload_m": 0, "max_indexing_threads": 0, "on_disk": True,
                               "ef_construct": 4, "full_scan_threshold": 10}
    assert dict(spec.optimizers)["deleted_threshold"] == 1.0


def test_a_bad_number_is_bad_input_for_the_cli(project) -> None:
    write_specs(project, BASE.replace("m = 16", "m = -16"))
    result = project.cli("plan", "--env", "prod", "--store", "qdrant")
    assert result.code == 2
    assert result.err.strip().splitlines() == ["error: qdrant_specs/rule1.toml: hnsw.m: must be 0 or more, not -16"]
    assert not (Path(project.environ["MOMENTRY_STATE_DIR"]) / "qdrant").exists()


def test_prune_leaves_every_collection_of_a_missing_alias_alone(project) -> None:
    old, live = old_and_live(project, "dev")
    with local_client(project) as c:
        c.update_collection_aliases(change_aliases_operations=[
            models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name="momentry_dev_rule1"))])
    before = layout(project)
    result = project.cli("prune", "--env", "dev", "--yes")
    assert result.code == 0
    assert result.out.splitlines() == [
        "qdrant dev: momentry_dev_rule1 is missing: its collections are left alone; run "
        "momentry-db migrate --env dev first",
        "prune dev: no old collections; nothing to delete"]
    assert layout(project) == before == ({}, {old: 5, live: 0})


def test_an_immutable_refusal_comes_before_any_store_writes(project, database) -> None:
    """migrate --env dev refuses a size change before PostgreSQL (pending here) is touched."""
    write_specs(project, BASE)
    assert migrate_qdrant(project, "dev").code == 0
    before = layout(project)
    write_specs(project, BASE.replace("size = 1024", "size = 768"))

    refused = project.cli("migrate", "--env", "dev")

    assert refused.code == 2, refused.err
    assert refused.err.strip().splitlines()[-1].startswith(
        "error: qdrant dev: momentry_dev_rule1 needs an immutable change")
    assert database.query("SELECT count(*) FROM pg_namespace WHERE nspname = 'dev'") == [(0,)]
    assert layout(project) == before
    assert "upgraded" not in refused.out


def test_check_spec_names_looks_past_a_spec_that_does_not_clash(tmp_path: Path) -> None:
    proj = load_project(tmp_path, {"MOMENTRY_STATE_DIR": str(tmp_path / "state")})
    shipped = qdrant.load_specs()
    sneaky = qdrant.CollectionSpec("dev_rule1", 1024, "Cosine")  # no source file: named by the spec's name
    with pytest.raises(ConfigError) as info:
        qdrant.check_spec_names([*shipped, sneaky], proj.environments())
    assert str(info.value) == (
        "qdrant specs: dev_rule1 gives prod the collection 'momentry_dev_rule1', which clashes with dev's "
        "'momentry_dev_rule1' (qdrant_specs/rule1.toml); rename the spec so that every environment keeps its own "
        "collections")
    qdrant.check_spec_names([*shipped, qdrant.CollectionSpec("faces", 512, "Cosine")], proj.environments())


def test_two_environments_own_collection_settings_are_left_to_verify(tmp_path: Path) -> None:
    import dataclasses

    proj = load_project(tmp_path, {"MOMENTRY_STATE_DIR": str(tmp_path / "state")})
    prod, dev = proj.environments()
    twin = dataclasses.replace(dev, name="twin", qdrant_collection=prod.qdrant_collection)
    qdrant.check_spec_names(qdrant.load_specs(), [prod, twin])  # no spec's doing: verify reports the overlap


VECTORS = '[vectors]\nsize = 1024\ndistance = "Cosine"\n'


@pytest.mark.parametrize("old, new, message", [
    ('name = "rule1"', 'name = ""', r"rule1.toml: name: must be a non-empty string$"),
    (VECTORS, "", r"rule1.toml: vectors: missing$"),
    (VECTORS, "vectors = 3\n", r"rule1.toml: vectors: must be a table$"),
    ("[vectors]", "[vectorz]", r"rule1.toml: vectorz: unknown field; known: name, vectors, hnsw, optimizers, "
                               r"payload_indexes$"),
    ("[vectors]", "[vectors", r"rule1.toml: not valid TOML \(Expected ']' at the end of a table declaration"),
])
def test_a_spec_missing_a_part_names_it(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        specs_with(tmp_path, old, new)


def test_a_whole_number_for_a_fraction_is_read_as_one(tmp_path: Path) -> None:
    (spec,) = specs_with(tmp_path, "indexing_threshold = 20000", "indexing_threshold = 20000\ndeleted_threshold = 1")
    optimizers = dict(spec.optimizers)
    assert optimizers == {"default_segment_number": 2, "deleted_threshold": 1.0, "indexing_threshold": 20000}
    assert type(optimizers["deleted_threshold"]) is float and type(optimizers["indexing_threshold"]) is int


def test_the_fingerprint_covers_what_is_declared_not_where() -> None:
    spec = qdrant.CollectionSpec("a", 1, "Dot")
    assert spec.fingerprint() == "e35985467e46"
    assert qdrant.CollectionSpec("a", 1, "Dot", source="elsewhere.toml").fingerprint() == "e35985467e46"
    assert qdrant.CollectionSpec("a", 2, "Dot").fingerprint() != "e35985467e46"


def test_an_immutable_change_plans_a_recreate_that_says_what_becomes_of_each_collection(tmp_path: Path) -> None:
    import dataclasses

    client = QdrantClient(":memory:")
    proj = load_project(tmp_path, {"MOMENTRY_STATE_DIR": str(tmp_path / "state")})
    t = qdrant.QdrantTarget(proj.environment("dev"), client=client)
    (spec,) = qdrant.load_specs()
    qdrant.apply(t, [spec])
    client.upsert("momentry_dev_rule1", points=[models.PointStruct(id=i, vector=[1.0] * 1024) for i in range(3)])
    old = "momentry_dev_rule1__bfa460f7"

    def recreate(new_spec: qdrant.CollectionSpec) -> tuple:
        (action,) = [a for a in qdrant.plan_collection(client, t, new_spec).actions if a.kind == "recreate"]
        return action.collection, action.detail, action.params

    dot = dataclasses.replace(spec, distance="Dot")
    assert recreate(dot) == (
        "momentry_dev_rule1__8e37f30e",
        "vectors 1024 Cosine -> 1024 Dot; alias momentry_dev_rule1 -> momentry_dev_rule1__8e37f30e (new; the 3 points "
        f"of {old} are copied into it); {old} (3 points) is kept", (("copy", True),))
    assert recreate(dataclasses.replace(spec, size=8)) == (
        "momentry_dev_rule1__9e3f940c",
        "vectors 1024 Cosine -> 8 Cosine; alias momentry_dev_rule1 -> momentry_dev_rule1__9e3f940c (new; vectors of "
        f"{old} are 1024 wide, so its 3 points are not copied); {old} (3 points) is kept", (("copy", False),))
    client.create_collection("momentry_dev_rule1__8e37f30e",
                             vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT))
    assert recreate(dot) == (
        "momentry_dev_rule1__8e37f30e",
        "vectors 1024 Cosine -> 1024 Dot; alias momentry_dev_rule1 -> momentry_dev_rule1__8e37f30e (kept from earlier, "
        f"0 points; the 3 points of {old} are copied into it); {old} (3 points) is kept",
        (("conflict", "qdrant: momentry_dev_rule1__8e37f30e already exists with vectors 4 Dot, not the spec's 1024 Dot; "
                      "rename or remove it (momentry-db prune lists it)"), ("copy", True)))
    client.create_collection("momentry_dev_x", vectors_config=models.VectorParams(size=1024, distance=models.Distance.COSINE))
    assert recreate(dataclasses.replace(spec, name="x", distance="Dot")) == (
        "momentry_dev_x__9ba5d1f0",
        "vectors 1024 Cosine -> 1024 Dot; alias momentry_dev_x -> momentry_dev_x__9ba5d1f0 (new; the 0 points of "
        "momentry_dev_x are copied into it); momentry_dev_x (0 points) is kept",
        (("conflict", "qdrant: momentry_dev_x is a plain collection, not an alias, so it cannot be swapped atomically; "
                      "migrate its points to an aliased collection first"), ("copy", True)))


@pytest.mark.parametrize("fill, state", [
    ({"from": "momentry_dev_rule1__bfa460f7", "complete": False}, "an interrupted copy"),
    ({"from": "momentry_dev_rule1__bfa460f7", "complete": True}, "kept from earlier"),
    ({"from": "momentry_dev_rule1__bfa460f7"}, "kept from earlier"),
    ("not a table", "kept from earlier"),
    (None, "kept from earlier"),
])
def test_a_recreate_says_whether_the_kept_collection_holds_an_interrupted_copy(tmp_path: Path, fill,
                                                                                state: str) -> None:
    import dataclasses

    client = QdrantClient(":memory:")
    proj = load_project(tmp_path, {"MOMENTRY_STATE_DIR": str(tmp_path / "state")})
    t = qdrant.QdrantTarget(proj.environment("dev"), client=client)
    (spec,) = qdrant.load_specs()
    qdrant.apply(t, [spec])
    dot = dataclasses.replace(spec, distance="Dot")
    new = qdrant.physical_name("momentry_dev_rule1", dot)
    client.create_collection(new, vectors_config=models.VectorParams(size=1024, distance=models.Distance.DOT),
                             metadata=None if fill is None else {qdrant.FILL_KEY: fill})
    client.upsert(new, points=[models.PointStruct(id=i, vector=[1.0] * 1024) for i in range(2)])
    (action,) = qdrant.plan_collection(client, t, dot).actions
    assert (action.kind, action.collection, action.params) == ("recreate", new, (("copy", True),))
    assert action.detail == (
        f"vectors 1024 Cosine -> 1024 Dot; alias momentry_dev_rule1 -> {new} ({state}, 2 points; the 0 points of "
        "momentry_dev_rule1__bfa460f7 are copied into it); momentry_dev_rule1__bfa460f7 (0 points) is kept")


def test_a_collection_with_named_vectors_is_planned_as_a_recreate(tmp_path: Path) -> None:
    client = QdrantClient(":memory:")
    proj = load_project(tmp_path, {"MOMENTRY_STATE_DIR": str(tmp_path / "state")})
    t = qdrant.QdrantTarget(proj.environment("dev"), client=client)
    (spec,) = qdrant.load_specs()
    client.create_collection("momentry_dev_rule1__named", vectors_config={
        "text": models.VectorParams(size=1024, distance=models.Distance.COSINE)})
    client.update_collection_aliases(change_aliases_operations=[models.CreateAliasOperation(
        create_alias=models.CreateAlias(collection_name="momentry_dev_rule1__named", alias_name="momentry_dev_rule1"))])
    plan = qdrant.plan_collection(client, t, spec)
    assert (plan.physical, plan.live_fingerprint) == ("momentry_dev_rule1__named", None)
    (action,) = plan.actions
    assert plan.immutable == action
    assert (action.kind, action.params) == ("recreate", (("copy", False),))
    assert action.detail == (
        "vectors None None -> 1024 Cosine; alias momentry_dev_rule1 -> momentry_dev_rule1__bfa460f7 (new; vectors of "
        "momentry_dev_rule1__named are None wide, so its 0 points are not copied); momentry_dev_rule1__named "
        "(0 points) is kept")


def test_a_spec_reaching_an_environments_own_physical_collection_is_refused(tmp_path: Path) -> None:
    proj = load_project(tmp_path, {"MOMENTRY_STATE_DIR": str(tmp_path / "state")})
    dev = proj.environment("dev", overrides={"QDRANT_COLLECTION": "momentry_dev_faces__v1"})
    envs = [proj.environment("prod"), dev]
    faces = qdrant.CollectionSpec("faces", 512, "Cosine", source="qdrant_specs/faces.toml")
    with pytest.raises(ConfigError) as info:
        qdrant.check_spec_names([faces], envs)
    assert str(info.value) == (
        "qdrant specs: qdrant_specs/faces.toml gives dev the collection 'momentry_dev_faces', which clashes with "
        "dev's 'momentry_dev_faces__v1' (its QDRANT_COLLECTION); rename the spec so that every environment keeps its "
        "own collections")
    qdrant.check_spec_names([qdrant.CollectionSpec("faces_v2", 512, "Cosine")], envs)


MINIMAL = 'name = "rule1"\n[vectors]\nsize = 1\ndistance = "Dot"\n'


def test_a_spec_of_name_and_vectors_alone_has_no_tuning(tmp_path: Path) -> None:
    (spec,) = qdrant.load_specs(spec_file(tmp_path / "specs", MINIMAL))
    assert spec == qdrant.CollectionSpec("rule1", 1, "Dot")
    assert (spec.hnsw, spec.optimizers, spec.payload_indexes, spec.source) == ((), (), (), "specs/rule1.toml")


@pytest.mark.parametrize("size", [1, 65536])
def test_the_edges_of_the_vector_size_are_accepted(tmp_path: Path, size: int) -> None:
    (spec,) = qdrant.load_specs(spec_file(tmp_path / "specs", MINIMAL.replace("size = 1", f"size = {size}")))
    assert spec.size == size


@pytest.mark.parametrize("extra, message", [
    ("[hnsw]\nm = 16.5\n", "hnsw.m: must be int, not float"),
    ("[hnsw]\nm = true\n", "hnsw.m: must be int, not bool"),
    ('[optimizers]\ndeleted_threshold = "x"\n', "optimizers.deleted_threshold: must be float, not str"),
    ("[optimizers]\ndeleted_threshold = false\n", "optimizers.deleted_threshold: must be float, not bool"),
    ("[hnsw]\nef = 4\n", "hnsw.ef: unknown field; known: m, ef_construct, full_scan_threshold, max_indexing_threads, "
                         "on_disk, payload_m"),
    ("[optimizers]\nthreshold = 4\n", "optimizers.threshold: unknown field; known: deleted_threshold, "
                                      "vacuum_min_vector_number, default_segment_number, max_segment_size, "
                                      "memmap_threshold, indexing_threshold, flush_interval_sec, "
                                      "max_optimization_threads"),
    ('[payload_indexes]\nvideo_id = "int"\n', "payload_indexes.video_id: must be one of keyword, integer, float, "
                                              "bool, geo, text, datetime, uuid"),
    ("hnsw = 3\n", None),
])
def test_a_bad_tuning_value_is_refused_naming_the_field_and_the_choices(tmp_path: Path, extra: str,
                                                                         message: str | None) -> None:
    text = extra + MINIMAL if message is None else MINIMAL + extra
    with pytest.raises(ConfigError) as info:
        qdrant.load_specs(spec_file(tmp_path / "specs", text))
    assert str(info.value) == f"specs/rule1.toml: {message or 'hnsw: must be a table'}"


def test_a_bad_distance_lists_the_distances(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        qdrant.load_specs(spec_file(tmp_path / "specs", MINIMAL.replace('"Dot"', '"dot"')))
    assert str(info.value) == "specs/rule1.toml: vectors.distance: must be one of Cosine, Dot, Euclid, Manhattan"


def test_several_changed_settings_are_listed_in_one_update() -> None:
    spec = qdrant.CollectionSpec("rule1", 4, "Dot", hnsw=(("ef_construct", 128), ("m", 32), ("on_disk", False)),
                                 payload_indexes=(("kind", "keyword"),))
    live = models.CollectionInfo(
        status=models.CollectionStatus.GREEN, optimizer_status=models.OptimizersStatusOneOf.OK, segments_count=1,
        payload_schema={"kind": models.PayloadIndexInfo(data_type=models.PayloadSchemaType.KEYWORD, points=0)},
        config=models.CollectionConfig(
            params=models.CollectionParams(vectors=models.VectorParams(size=4, distance=models.Distance.DOT)),
            hnsw_config=models.HnswConfig(m=16, ef_construct=100, full_scan_threshold=10000, on_disk=False),
            optimizer_config=models.OptimizersConfig(deleted_threshold=0.2, vacuum_min_vector_number=1000,
                                                     default_segment_number=0, flush_interval_sec=5),
            wal_config=models.WalConfig(wal_capacity_mb=32, wal_segments_ahead=0)))
    assert qdrant._mutable_actions(live, "phys", spec) == [
        qdrant.Action("update_hnsw", "phys", "ef_construct 100 -> 128, m 16 -> 32", (("ef_construct", 128), ("m", 32)))]


@pytest.mark.parametrize("stamp", ['{"meta": null, "fingerprints": []}', "[1, 2]", "{not json", ""])
def test_a_stamp_this_version_did_not_write_means_a_full_look_and_a_new_stamp(project, stamp: str) -> None:
    assert migrate_qdrant(project, "dev").code == 0
    path = Path(project.environ["MOMENTRY_STATE_DIR"]) / "qdrant-applied.json"
    path.write_text(stamp)
    again = migrate_qdrant(project, "dev", "--json")
    assert again.code == 0, again.out
    assert [(t["outcome"], t["applied"]) for t in json.loads(again.out)["targets"]] == [("up to date", [])]
    written = json.loads(path.read_text())
    assert list(written["fingerprints"]) == ["momentry_dev_rule1"] and len(written["meta"]) == 2

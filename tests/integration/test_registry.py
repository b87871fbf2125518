"""The Confluent wire format through a real schema registry (Apicurio 3.3.3 with SQL storage).

The stack's registry serves most tests (each sandbox has subjects of its own, named after
its topics); the outage and restart tests run a private Apicurio on a free port with a
database of its own, so stopping it touches nobody else.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import uuid

import fastavro
import pytest

from streams.errors import Refused
from streams.io.codec import SCHEMA_DIR, confluent_header, fingerprint, schema_text, schema_versions
from streams.io.kafka import ensure_topics, read_topic, send_records
from streams.io.registry import COMPATIBILITY, NotFound, SchemaRegistry, subject
from streams.ops import schemas
from streams.settings import Settings
from streams_dev.sandbox import _free_ports
from streams_dev.stack.registry import Registry
from tests.helpers import isolated_pipeline
from tests.integration.test_replay import checksum, drain, replay

pytestmark = pytest.mark.integration

NAMES = {"raw": "raw_envelope", "masked": "masked_login", "dlq": "dead_letter"}


def topics(settings: Settings) -> dict[str, str]:
    return {"raw": settings.raw_topic, "masked": settings.masked_topic, "dlq": settings.dlq_topic}


def latest(name: str) -> dict:
    versions = schema_versions(name)
    return versions[max(versions)]


def test_deploy_registers_every_version_backward_transitive_and_refuses_a_breaking_change(pipeline, tmp_path):
    s = pipeline.settings
    registry = SchemaRegistry(s)
    with pytest.raises(NotFound):  # nothing registered before the deploy step
        registry.lookup(subject(s.raw_topic), schema_text(latest("raw_envelope")))

    result = pipeline.run("topics", "apply")
    assert result.returncode == 0, result.stderr
    ids = {}
    for role, topic in topics(s).items():
        assert f"{subject(topic)}: {NAMES[role]} v1.." in result.stdout
        assert registry.compatibility(subject(topic)) == COMPATIBILITY
        ids[role] = [
            registry.lookup(subject(topic), schema_text(v)) for _, v in sorted(schema_versions(NAMES[role]).items())
        ]
    again = pipeline.run("migrate")  # the other deploy step: registering again changes nothing
    assert again.returncode == 0, again.stderr
    for role, topic in topics(s).items():
        assert ids[role][-1] == registry.lookup(subject(topic), schema_text(latest(NAMES[role])))

    # A breaking version: a new required field without a default cannot read the old records.
    broken = tmp_path / "schemas"
    shutil.copytree(SCHEMA_DIR, broken)
    v3 = latest("masked_login")
    v3["fields"].append({"name": "region", "type": "string"})
    (broken / "masked_login.v3.avsc").write_text(json.dumps(v3))
    with pytest.raises(Refused) as refused:
        schemas.register(s, broken)
    message = str(refused.value)
    assert "\n" not in message
    assert f"masked_login v3 refused by the schema registry for subject {subject(s.masked_topic)}" in message
    with pytest.raises(NotFound):
        registry.lookup(subject(s.masked_topic), schema_text(v3))


def test_a_worker_refuses_to_start_when_its_schemas_are_not_registered(stack_settings, tmp_path):
    p = isolated_pipeline(stack_settings, tmp_path)
    p.deployed = True  # skip the deploy step on purpose
    p.migrate()
    try:
        result = p.run("worker", timeout=120)
    finally:
        p.stop_all()
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert last.startswith("streams worker: schema raw_envelope v1 is not registered under subject")
    assert last.endswith("run `streams topics apply` (the deploy step registers schemas)")


def test_every_topic_carries_the_confluent_format_and_its_ids_resolve_in_the_registry(pipeline, sample_path):
    sample = json.loads(sample_path.read_text())
    pipeline.send(sample)
    pipeline.start("bridge")
    pipeline.start("worker")
    s = pipeline.settings
    pipeline.wait_for(lambda: pipeline.row_count() == 99, 120, "99 rows")
    pipeline.wait_for(lambda: len(pipeline.dead_letters()) == 1, 60, "the one dead letter")

    registry = SchemaRegistry(s)
    for role, topic in topics(s).items():
        values = [v for _, v in read_topic(s, topic) if v is not None]
        assert len(values) == {"raw": 100, "masked": 99, "dlq": 1}[role]
        assert all(v[:1] == b"\x00" for v in values), role
        (schema_id,) = {int.from_bytes(v[1:5], "big") for v in values}
        served = json.loads(registry.schema(schema_id))
        assert fingerprint(served) == fingerprint(latest(NAMES[role])), role
        for v in values:  # the datum after the header is plain Avro of that schema
            fastavro.schemaless_reader(io.BytesIO(v[5:]), fastavro.parse_schema(served))
    masked_ids = {pipeline.codecs.masked.decode(v)["message_id"] for _, v in read_topic(s, s.masked_topic) if v}
    assert masked_ids == {r["message_id"] for r in pipeline.query("SELECT message_id FROM user_logins")}


def test_replay_across_the_switch_to_the_registry_keeps_the_table(pipeline, sample_path):
    sample = json.loads(sample_path.read_text())
    s = pipeline.settings
    off = {"STREAMS_SCHEMA_REGISTRY_URL": ""}
    pipeline.send(sample)
    bridge = pipeline.start("bridge", **off)
    worker = pipeline.start("worker", **off)
    pipeline.wait_for(lambda: pipeline.row_count() == 99, 120, "99 rows")
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic, s.masked_topic]) == 0, 60, "committed offsets")
    assert pipeline.stop(worker) == 0
    assert pipeline.stop(bridge) == 0
    before = checksum(pipeline)
    assert {v[:2] for _, v in read_topic(s, s.masked_topic) if v} == {b"\xc3\x01"}  # single-object so far

    # The registry turned on (the sandbox's default env), then both stages replayed from earliest.
    replay(pipeline, "mask", "--to", "earliest")
    replay(pipeline, "sink", "--to", "earliest")
    drain(pipeline, [s.raw_topic, s.masked_topic])

    formats = [v[:1] for _, v in read_topic(s, s.masked_topic) if v]
    assert formats.count(b"\xc3") == 99 and formats.count(b"\x00") == 99  # old records and their replays
    assert checksum(pipeline) == before
    assert pipeline.row_count() == 99


def test_an_id_the_registry_does_not_have_is_an_unknown_schema_dead_letter(pipeline):
    s = pipeline.settings
    ensure_topics(s)
    good = pipeline.codecs.raw.encode(
        {"message_id": "good-1", "sent_at": 1_700_000_000_000, "body": json.dumps(_login()), "attributes": {}}
    )
    stranger = confluent_header(2**31 - 1) + good[5:]  # an id from another registry
    send_records(s, [(s.raw_topic, b"stranger-1", stranger), (s.raw_topic, b"good-1", good)])
    pipeline.start("worker")
    pipeline.wait_for(lambda: pipeline.row_count() == 1, 120, "the good row")
    dead = pipeline.wait_for(lambda: pipeline.dead_letters(), 60, "the dead letter")
    assert [(d["message_id"], d["reason"], d["payload"]) for d in dead] == [("stranger-1", "unknown_schema", stranger)]
    assert str(2**31 - 1) in dead[0]["detail"]


def _login(i: int = 0) -> dict:
    return {
        "user_id": f"u{i}",
        "app_version": "2.3.0",
        "device_type": "ios",
        "ip": f"10.0.0.{i % 250}",
        "locale": "RU",
        "device_id": f"d-{i}",
    }


# --- a private registry: stopped and restarted ------------------------------------------


@pytest.fixture(scope="module")
def private_registry(stack_settings, tmp_path_factory):
    """An Apicurio of our own (free port, own database on the stack's PostgreSQL)."""
    (port,) = _free_ports(1)
    settings = stack_settings.model_copy(
        update={"stack_dir": tmp_path_factory.mktemp("registry-stack"), "registry_port": port}
    )
    database = f"apicurio_t{uuid.uuid4().hex[:10]}"
    service = Registry(settings, database=database)
    service.start()
    try:
        yield service
    finally:
        service.stop()
        asyncio.run(_drop(stack_settings, database))


async def _drop(settings: Settings, database: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(host="127.0.0.1", port=settings.pg_port, user="postgres", database="postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()


def _restart(service: Registry) -> None:
    service.stop()
    service.start()


def test_a_restarted_registry_keeps_its_ids(private_registry, stack_settings, tmp_path):
    s = stack_settings.model_copy(
        update={"schema_registry_url": private_registry.url, "raw_topic": f"r{uuid.uuid4().hex[:8]}.raw"}
    )
    schemas.register(s)
    registry = SchemaRegistry(s)
    before = {
        (role, v): registry.lookup(subject(topic), schema_text(schema))
        for role, topic in topics(s).items()
        for v, schema in schema_versions(NAMES[role]).items()
    }
    texts = {schema_id: registry.schema(schema_id) for schema_id in before.values()}

    _restart(private_registry)

    after = {
        (role, v): registry.lookup(subject(topic), schema_text(schema))
        for role, topic in topics(s).items()
        for v, schema in schema_versions(NAMES[role]).items()
    }
    assert after == before
    assert {schema_id: registry.schema(schema_id) for schema_id in after.values()} == texts


def test_a_registry_down_at_start_or_while_running_loses_nothing(private_registry, stack_settings, tmp_path):
    p = isolated_pipeline(
        stack_settings,
        tmp_path,
        STREAMS_SCHEMA_REGISTRY_URL=private_registry.url,
        STREAMS_STARTUP_TIMEOUT="300",
        STREAMS_RETRY_MAX_BACKOFF="1",
    )
    try:
        s = p.settings
        p.deploy()
        codec = p.codecs.raw
        # A newer writer's schema (one more optional field), registered by someone else's
        # deploy: its id is not among those the worker looks up at start.
        newer = latest("raw_envelope")
        newer["fields"].append({"name": "region", "type": ["null", "string"], "default": None})
        newer_id = SchemaRegistry(s).register(subject(s.raw_topic), schema_text(newer))
        assert confluent_header(newer_id) != codec.header
        ensure_topics(s)

        private_registry.stop()  # down at start: the worker waits it out
        worker = p.start("worker")
        p.wait_for(lambda: "schema registry" in p.log_of(worker), 60, "the worker waiting for the registry")
        private_registry.start()
        send_records(s, [(s.raw_topic, b"m1", codec.encode(_envelope(1)))])
        p.wait_for(lambda: p.row_count() == 1, 120, "the first row")

        private_registry.stop()  # down while running: cached ids need no registry...
        send_records(s, [(s.raw_topic, b"m2", codec.encode(_envelope(2)))])
        p.wait_for(lambda: p.row_count() == 2, 60, "a row while the registry is down")

        writer = fastavro.parse_schema(newer)
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, {**_envelope(3), "region": "eu"})
        send_records(s, [(s.raw_topic, b"m3", confluent_header(newer_id) + buf.getvalue())])
        # ...but a new id must wait for it: retried, not acked, not dead-lettered.
        p.wait_for(
            lambda: f"fetch schema id {newer_id} from the schema registry failed" in p.log_of(worker), 60, "a retry"
        )
        assert p.row_count() == 2 and p.lag([s.raw_topic]) >= 1

        private_registry.start()
        p.wait_for(lambda: p.row_count() == 3, 120, "the record written with the new schema id")
        p.wait_for(lambda: p.lag([s.raw_topic, s.masked_topic]) == 0, 60, "everything committed")
        assert p.dead_letters() == []
    finally:
        p.stop_all()
        if private_registry.pid() is None:
            private_registry.start()


def _envelope(i: int) -> dict:
    return {"message_id": f"m{i}", "sent_at": 1_700_000_000_000 + i, "body": json.dumps(_login(i)), "attributes": {}}


def test_a_registry_url_that_is_not_the_confluent_api_is_one_line(stack_settings):
    from streams.errors import ConfigError
    from streams.io.codec import Codecs

    s = stack_settings.model_copy(update={"schema_registry_url": f"http://127.0.0.1:{stack_settings.registry_port}"})
    with pytest.raises(ConfigError, match="must be the base of the Confluent-compatible API") as err:
        Codecs.from_settings(s)
    assert "\n" not in str(err.value)

"""A third-party consumer of the masked topic: Kafka Connect with the Debezium JDBC sink.

Kafka Connect (distributed mode, its own group and internal topics) reads the sandbox's
masked topic through Apicurio's converter, with the shipped deploy/connect/ settings, into
a table of its own; that table must equal ``user_logins`` row for row, and a tombstone on
the masked topic must remove the row from both.
"""

from __future__ import annotations

import io
import json
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import fastavro
import pytest
from confluent_kafka import Producer

from streams.io.codec import confluent_header, schema_text, schema_versions
from streams.io.registry import SchemaRegistry
from streams_dev.connect import ConnectWorker, apicurio_api_url, sink_config
from streams_dev.sandbox import _free_ports

pytestmark = [pytest.mark.integration, pytest.mark.connect]

TABLE = "logins_connect"
# The columns both tables share: identity, tokens and fields. sent_at as epoch milliseconds:
# timestamptz in user_logins, a UTC timestamp without zone in Connect's table (use.time.zone=UTC).
COLUMNS = (
    "message_id, user_id, device_type, locale, app_version_raw, app_version, "
    "masked_ip, masked_device_id, ip_is_valid, (extract(epoch FROM sent_at) * 1000)::bigint AS sent_at_ms"
)


@pytest.fixture
def pipeline_with_registry(pipeline):
    url = pipeline.settings.schema_registry_url
    assert url, "the Connect test reads the Confluent wire format: the sandbox needs STREAMS_SCHEMA_REGISTRY_URL"
    return pipeline


@pytest.fixture
def connect_starting(pipeline_with_registry, stack_settings, tmp_path):
    """A Connect worker of this test's own, starting in the background while the pipeline runs
    Yields the worker and the future of its start."""
    (port,) = _free_ports(1)
    worker = ConnectWorker(
        stack_settings,
        tmp_path / "connect",
        rest_port=port,
        registry_url=pipeline_with_registry.settings.schema_registry_url,
    )
    worker.dir.mkdir(parents=True)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="connect") as pool:
        ready = pool.submit(worker.start)
        try:
            yield worker, ready
        finally:
            ready.exception()  # a start still under way finishes (or fails) first
            worker.stop()
            worker.delete_topics()


def sink_running(connect: ConnectWorker, name: str) -> bool:
    """True once the connector and its task run; fails at once, with Connect's trace, if the task failed."""
    state, tasks = connect.connector_state(name)
    failed = [t.get("trace", "")[:2000] for t in tasks if t["state"] == "FAILED"]
    assert not failed, f"connector task failed: {failed[0]}"
    return state == "RUNNING" and bool(tasks) and all(t["state"] == "RUNNING" for t in tasks)


def rows(pipeline, table: str) -> list[tuple]:
    return [tuple(r) for r in pipeline.query(f"SELECT {COLUMNS} FROM {table} ORDER BY message_id")]


def connect_rows(pipeline) -> list[tuple]:
    try:
        return rows(pipeline, TABLE)
    except asyncpg.UndefinedTableError:  # the connector creates the table with its first batch
        return []


def test_connect_reads_the_masked_topic_into_its_own_table(pipeline_with_registry, connect_starting, sample_path):
    pipeline = pipeline_with_registry
    connect, connect_ready = connect_starting
    s = pipeline.settings
    sample = json.loads(sample_path.read_text())
    pipeline.send(sample)
    bridge = pipeline.start("bridge")
    worker = pipeline.start("worker")
    pipeline.wait_for(lambda: pipeline.row_count() == 99, 120, "99 rows in user_logins")

    connect_ready.result()
    name = f"{s.app_id}-jdbc-sink"
    connect.put_connector(name, sink_config(topic=s.masked_topic, pg_dsn=s.pg_dsn.get_secret_value(), table=TABLE))
    began = time.monotonic()

    pipeline.wait_for(
        lambda: sink_running(connect, name) and len(connect_rows(pipeline)) == 99, 120, f"99 rows in {TABLE}"
    )
    copied_in = time.monotonic() - began
    expected = rows(pipeline, "user_logins")
    assert connect_rows(pipeline) == expected
    # Tokens, not plaintext, and no recovery ciphertexts in the warehouse copy.
    columns = {
        r["column_name"]
        for r in pipeline.query(f"SELECT column_name FROM information_schema.columns WHERE table_name = '{TABLE}'")
    }
    assert not columns & {"ip_ciphertext", "device_id_ciphertext", "ip", "device_id"}
    assert all(r[6].startswith("h1.") and r[7].startswith("h1.") for r in expected)

    # A tombstone (what `streams erase` writes) deletes the row in user_logins and in Connect's table.
    gone = expected[0][0]
    producer = Producer({"bootstrap.servers": s.kafka_bootstrap, "enable.idempotence": True})
    producer.produce(s.masked_topic, key=gone.encode(), value=None)
    assert producer.flush(30) == 0
    pipeline.wait_for(
        lambda: gone not in {r[0] for r in connect_rows(pipeline)} and pipeline.row_count() == 98,
        60,
        f"the tombstoned row gone from {TABLE} and user_logins",
    )
    assert connect_rows(pipeline) == rows(pipeline, "user_logins") == expected[1:]
    for proc in (bridge, worker):  # the probe below is for Connect alone
        assert pipeline.stop(proc) == 0

    # The id in a record is a content id: the converter must not read it as a global id.
    probe_id, probe = produce_probe(pipeline)
    pipeline.wait_for(
        lambda: sink_running(connect, name) and probe_id in {r[0] for r in connect_rows(pipeline)}, 60, "the probe row"
    )
    row = next(r for r in connect_rows(pipeline) if r[0] == probe_id)
    assert row == (
        probe_id,
        probe["user_id"],
        probe["device_type"],
        probe["locale"],
        probe["app_version_raw"],
        probe["app_version"],
        probe["masked_ip"],
        probe["masked_device_id"],
        probe["ip_is_valid"],
        probe["sent_at"],
    )
    print(f"\nconnect: worker ready in {connect.ready_in:.1f}s, 99 rows copied in {copied_in:.1f}s")


def produce_probe(pipeline) -> tuple[str, dict]:
    """One masked record written under a schema whose content id is not its global id.

    The probe's writer schema is the latest masked schema with its fields in reverse order
    and a unique doc: new content, which no other schema decodes into the same row. Before
    it, a unique decoy is registered twice (two global ids, one content id), so global ids
    run ahead of content ids even in a fresh registry: a converter that took the record's
    id for a global id would decode with another schema and write another row, or fail.
    """
    s = pipeline.settings
    registry = SchemaRegistry(s)
    tag = uuid.uuid4().hex[:10]
    decoy = {"type": "record", "name": f"Decoy{tag}", "fields": [{"name": "n", "type": "double"}]}
    for n in (1, 2):
        registry.register(f"{s.app_id}.decoy{n}-value", schema_text(decoy))
    versions = schema_versions("masked_login")
    latest = versions[max(versions)]
    schema = {**latest, "doc": f"connect probe {tag}", "fields": latest["fields"][::-1]}
    content_id = registry.register(f"{s.app_id}.probe-value", schema_text(schema))
    by_global_id = urllib.request.urlopen(f"{apicurio_api_url(s.schema_registry_url)}/ids/globalIds/{content_id}")
    assert json.loads(by_global_id.read()) != schema, "the probe's global id is its content id: no probe"

    message_id = f"probe-{tag}"
    probe = {
        "message_id": message_id,
        "sent_at": 1_700_000_000_123,
        "user_id": f"user-{tag}",
        "device_type": "android",
        "locale": None,
        "app_version_raw": "2.3.0",
        "app_version": 2_003_000,
        "masked_ip": f"h1.ip-{tag}",
        "masked_device_id": f"h1.dev-{tag}",
        "ip_ciphertext": "k0.unused",
        "device_id_ciphertext": "k0.unused",
        "ip_is_valid": False,
    }
    datum = io.BytesIO()
    fastavro.schemaless_writer(datum, fastavro.parse_schema(schema), probe)
    producer = Producer({"bootstrap.servers": s.kafka_bootstrap, "enable.idempotence": True})
    producer.produce(s.masked_topic, key=message_id.encode(), value=confluent_header(content_id) + datum.getvalue())
    assert producer.flush(30) == 0
    return message_id, probe

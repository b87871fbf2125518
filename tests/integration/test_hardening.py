"""Issue 9 through the real stages: no single record stops, fools or silently skews the pipeline."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from streams.io.kafka import send_records
from streams.ops.topics import ensure_topics
from streams.pipeline.sink import PostgresSink
from tests.factories import CODECS, LOGIN, masked_value, raw_value

pytestmark = pytest.mark.integration

BODY = LOGIN


def reasons(p) -> list[str]:
    return sorted(d["reason"] for d in p.dead_letters())


def test_a_raw_tombstone_is_dead_lettered_and_the_partition_moves_on(pipeline):
    p, s = pipeline, pipeline.settings
    ensure_topics(s)
    send_records(
        s,
        [(s.raw_topic, b"t-1", None)]
        + [
            (s.raw_topic, f"ok-{i}".encode(), raw_value(f"ok-{i}", json.dumps({**BODY, "user_id": f"u{i}"})))
            for i in range(5)
        ],
    )
    worker = p.start("worker")
    p.wait_for(lambda: p.row_count() == 5, 120, "5 rows behind the tombstone")
    p.wait_for(lambda: reasons(p) == ["empty_record"], 60, "one empty_record dead letter")
    p.wait_for(lambda: p.lag([s.raw_topic]) == 0, 60, "the raw topic committed past the tombstone")
    assert worker.poll() is None


def test_a_masked_tombstone_deletes_its_row_and_a_replay_keeps_it_deleted(pipeline):
    p, s = pipeline, pipeline.settings
    ensure_topics(s)
    send_records(s, [(s.masked_topic, m.encode(), masked_value(m)) for m in ("keep", "gone")], chunk=10)
    worker = p.start("worker", STREAMS_STAGES="sink")
    p.wait_for(lambda: p.row_count() == 2, 120, "2 rows")
    send_records(s, [(s.masked_topic, b"gone", None)])
    p.wait_for(lambda: p.row_count() == 1, 60, "the tombstoned row deleted")
    p.wait_for(lambda: p.lag([s.masked_topic]) == 0, 60, "the sink committed")
    assert p.stop(worker) == 0
    replay = p.run("replay", "sink", "--to", "earliest")
    assert replay.returncode == 0, replay.stderr
    p.start("worker", STREAMS_STAGES="sink", STREAMS_APP_ID=s.app_id)
    p.wait_for(lambda: p.lag([s.masked_topic]) == 0, 120, "the replay committed")
    assert [r["message_id"] for r in p.query("SELECT message_id FROM user_logins")] == ["keep"]
    assert p.dead_letters() == []


def test_a_dead_letter_over_kafkas_size_limit_is_truncated_and_the_batch_goes_on_once(pipeline):
    """A near-1 MB invalid body: its dead letter is over the limit; the valid records are produced once."""
    p, s = pipeline, pipeline.settings
    ensure_topics(s)
    big = raw_value("big", "{" + "x" * 999_900)  # just under the 1,000,000-byte limit; its dead letter is over
    send_records(
        s,
        [(s.raw_topic, b"big", big)]
        + [
            (s.raw_topic, f"ok-{i}".encode(), raw_value(f"ok-{i}", json.dumps({**BODY, "user_id": f"u{i}"})))
            for i in range(3)
        ],
    )
    p.start("worker")
    p.wait_for(lambda: p.row_count() == 3, 120, "3 rows")
    p.wait_for(lambda: len(p.dead_letters()) == 1, 60, "the dead letter")
    p.wait_for(lambda: p.lag([s.raw_topic, s.masked_topic]) == 0, 60, "both stages committed")
    (dead,) = p.dead_letters()
    assert (dead["reason"], dead["payload_truncated"], len(dead["payload"])) == ("invalid_json", True, 64 * 1024)
    assert sorted(k for k, _ in p.topic(s.masked_topic)) == [b"ok-0", b"ok-1", b"ok-2"]  # one copy each


def test_an_over_long_message_id_on_the_masked_topic_is_dead_lettered_not_retried(pipeline):
    p, s = pipeline, pipeline.settings
    ensure_topics(s)
    long_id = "x" * 6000
    send_records(s, [(s.masked_topic, b"long", masked_value(long_id)), (s.masked_topic, b"fine", masked_value("fine"))])
    p.start("worker", STREAMS_STAGES="sink")
    p.wait_for(lambda: p.row_count() == 1, 120, "the valid row")
    p.wait_for(lambda: reasons(p) == ["invalid_message_id"], 60, "an invalid_message_id dead letter")


def test_bridge_dead_letters_bodies_over_the_bound_and_records_kafka_refuses(pipeline):
    p, s = pipeline, pipeline.settings
    ids = p.send(["y" * 150_000, "z" * 95_000, json.dumps(BODY)])
    # 150,000 bytes is over STREAMS_MAX_BODY_BYTES; 95,000 passes it but not librdkafka's message.max.bytes.
    bridge = p.start(
        "bridge", STREAMS_MAX_BODY_BYTES="100000", STREAMS_KAFKA_EXTRA=json.dumps({"message.max.bytes": "90000"})
    )
    p.wait_for(lambda: p.queue_depth() == 0, 60, "the queue emptied: every message deleted")
    p.wait_for(lambda: len(p.dead_letters()) == 2, 60, "two dead letters")
    dead = {d["message_id"]: d for d in p.dead_letters()}
    assert dead[ids[1]]["reason"] == "too_large" and dead[ids[1]]["stage"] == "bridge"
    assert dead[ids[1]]["payload_truncated"] and len(dead[ids[1]]["payload"]) == 64 * 1024
    assert "MSG_SIZE_TOO_LARGE" in dead[ids[1]]["detail"]
    assert dead[ids[0]]["reason"] == "too_large" and "STREAMS_MAX_BODY_BYTES" in dead[ids[0]]["detail"]
    assert dead[ids[0]]["payload_truncated"] and dead[ids[0]]["payload"] == b"y" * 64 * 1024
    assert [k for k, _ in p.topic(s.raw_topic)] == [ids[2].encode()]
    assert bridge.poll() is None  # every poller still alive: the next message still moves
    more = p.send([json.dumps(BODY)] * 8)
    p.wait_for(lambda: len(p.topic(s.raw_topic)) == 9, 60, "later messages bridged")
    assert {k.decode() for k, _ in p.topic(s.raw_topic)} == {ids[2], *more}


def test_a_hung_statement_times_out_as_a_transient_failure(pipeline):
    """A lock held elsewhere (like a half-open connection) fails the write; it does not hang the sink."""
    s = pipeline.settings
    dsn = s.pg_dsn.get_secret_value()

    async def go() -> None:
        from streams.io.postgres import connect, migrate

        holder = await connect(dsn)
        await migrate(holder)
        sink = PostgresSink(dsn, command_timeout=0.5)
        try:
            async with holder.transaction():
                await holder.execute("LOCK TABLE user_logins IN ACCESS EXCLUSIVE MODE")
                with pytest.raises(TimeoutError):
                    await sink.write([CODECS.masked.decode(masked_value(f"t-{uuid.uuid4().hex[:6]}"))])
            assert sink._conn is None  # dropped: the retry gets a fresh connection
        finally:
            await sink.close()
            await holder.close()

    asyncio.run(go())

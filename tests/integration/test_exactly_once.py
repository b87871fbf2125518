"""The mask stage is exactly-once on the topics (issue 18): kills, zombies, rebalances, bridge copies.

The masked topic is compacted, and compaction hides duplicates; these tests count copies
while the topics are fresh (the active segment is never cleaned), with a
``read_committed`` reader (what every consumer should see) and, to prove the kills landed
inside transactions, a ``read_uncommitted`` one.
"""

from __future__ import annotations

import collections
import json
import signal
import threading
import urllib.request

import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from benchmarks.throughput import produce_raw
from streams.errors import TransientError
from streams.io.codec import Codecs
from streams.io.kafka import group_lag, metadata_consumer, send_records
from streams.ops.topics import ensure_topics
from streams.pipeline.dedup import DedupWindow, decode
from streams_dev.sandbox import _free_ports

pytestmark = pytest.mark.integration

MASK_ONLY = {"STREAMS_STAGES": "mask", "STREAMS_LOG_LEVEL": "info"}


def message_ids(settings, topic: str, isolation: str) -> collections.Counter:
    """Copies per message id (the record key) on ``topic`` as a reader with ``isolation`` sees it."""
    return collections.Counter(key for key, _ in records_of(settings, topic, isolation))


def records_of(settings, topic: str, isolation: str) -> list[tuple[str, tuple[int, int]]]:
    """``(key, (partition, offset))`` of every record on ``topic`` as a reader with ``isolation`` sees it."""
    consumer = metadata_consumer(settings, None, **{"enable.partition.eof": True, "isolation.level": isolation})
    records = []
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        remaining = set(partitions)
        while remaining:
            msg = consumer.poll(30)
            assert msg is not None, f"no record nor end of {topic} within 30 s"
            if msg.error() is not None:
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    remaining.discard(msg.partition())
                continue
            records.append((msg.key().decode(), (msg.partition(), msg.offset())))
    finally:
        consumer.close()
    return records


def outputs(pipeline, isolation: str = "read_committed") -> collections.Counter:
    s = pipeline.settings
    return message_ids(s, s.masked_topic, isolation) + message_ids(s, s.dlq_topic, isolation)


def logins(sample_path, copies: int) -> list[dict]:
    return json.loads(sample_path.read_text()) * copies  # 99 valid logins and one dead letter per 100


def test_mask_killed_mid_transaction_again_and_again_writes_each_id_once(pipeline, sample_path):
    s = pipeline.settings
    ids = produce_raw(s, logins(sample_path, 40))  # 4,000 records, 40 of them dead letters
    # Transactions of 3 batches of 100. Each life stops inside its 5th batch, after the
    # produce (batches 4 and 5 in an open transaction), and is SIGKILLed there.
    env = {**MASK_ONLY, "STREAMS_BATCH_SIZE": "100", "STREAMS_COMMIT_RECORDS": "300", "STREAMS_COMMIT_INTERVAL": "30"}
    for life in range(3):
        committed = sum(outputs(pipeline).values())
        worker = pipeline.start("worker", STREAMS_FAULT="mask_after_produce@5:hang", STREAMS_WORKER_SLOT="0", **env)
        pipeline.stopped.add(worker)
        pipeline.wait_for(
            lambda before=committed: (
                sum(outputs(pipeline, "read_uncommitted").values()) > sum(outputs(pipeline).values()) > before
            ),
            120,
            f"life {life + 1} to commit, then hold records in an open transaction",
        )
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    pipeline.start("worker", STREAMS_WORKER_SLOT="0", **env)
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic]) == 0, 180, "the raw topic fully committed")

    uncommitted = outputs(pipeline, "read_uncommitted")
    assert any(n > 1 for n in uncommitted.values()), "no kill landed inside a transaction"
    committed = outputs(pipeline)
    assert set(committed) == set(ids)
    assert set(committed.values()) == {1}, [i for i, n in committed.items() if n > 1][:5]
    assert sum(message_ids(s, s.dlq_topic, "read_committed").values()) == 40


def test_a_fenced_zombie_exits_and_its_writes_are_refused(pipeline, sample_path):
    s = pipeline.settings
    ensure_topics(s)
    zombie = pipeline.start("worker", STREAMS_WORKER_SLOT="7", **MASK_ONLY)
    pipeline.wait_for(lambda: "assigned 6 partitions" in pipeline.log_of(zombie), 120, "the first worker's partitions")
    ids = produce_raw(s, logins(sample_path, 2))
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic]) == 0, 120, "the first records masked")
    # A second worker in the same slot: its producer fences the first one's.
    pipeline.stopped.add(zombie)
    successor = pipeline.start("worker", STREAMS_WORKER_SLOT="7", **MASK_ONLY)
    pipeline.wait_for(
        lambda: "dedup window of partition" in pipeline.log_of(successor), 120, "the second worker's start"
    )
    ids += produce_raw(s, logins(sample_path, 5))
    pipeline.wait_for(lambda: zombie.poll() is not None, 120, "the zombie to exit")
    assert zombie.returncode == 75
    last = [line for line in pipeline.log_of(zombie).splitlines() if "stage mask stops" in line]
    assert len(last) == 1 and "STREAMS_WORKER_SLOT" in last[0]
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic]) == 0, 180, "the successor to mask everything")
    committed = outputs(pipeline)
    assert set(committed) == set(ids) and set(committed.values()) == {1}


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_worker_joins_and_leaves_under_load_nothing_lost_or_doubled(pipeline, sample_path):
    s = pipeline.settings
    ensure_topics(s)
    # Long transactions (3 s): a rebalance finds one open, with records in it.
    env = {
        **MASK_ONLY,
        "STREAMS_BATCH_SIZE": "200",
        "STREAMS_COMMIT_INTERVAL": "3",
        "STREAMS_COMMIT_RECORDS": "1000000",
    }
    first = [pipeline.start("worker", STREAMS_WORKER_SLOT=str(i), **env) for i in range(2)]
    pipeline.wait_for(
        lambda: all("assigned" in pipeline.log_of(w) for w in first), 120, "two workers sharing the partitions"
    )
    # Load all along: 1,000 records every 0.1 s until the joiner has come and gone.
    ids: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            ids.extend(produce_raw(s, logins(sample_path, 10)))
            stop.wait(0.1)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        pipeline.wait_for(lambda: sum(outputs(pipeline).values()) > 0, 120, "the first committed outputs")
        port = _free_ports(1)[0]
        joiner = pipeline.start("worker", STREAMS_WORKER_SLOT="2", STREAMS_METRICS_PORT=str(port), **env)
        # The joiner commits transactions of its own (its outputs are counted on commit only)...
        pipeline.wait_for(
            lambda: _safe(lambda: metric(port, 'streams_records_out_total{outcome="masked"')) > 1000,
            180,
            "the joiner to commit",
        )
        # ...and leaves while records keep coming.
        assert pipeline.stop(joiner) == 0
        pipeline.wait_for(lambda: "revoked" in pipeline.log_of(first[0]) + pipeline.log_of(first[1]), 60, "a revoke")
    finally:
        stop.set()
        loader.join(60)
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic]) == 0, 300, "the rest of the records")
    logs = "".join(pipeline.log_of(w) for w in first) + pipeline.log_of(joiner)
    assert "revoke: committed the batch in flight" in logs  # a revoke found a transaction in flight
    committed = outputs(pipeline)
    assert len(ids) > 10_000 and set(committed) == set(ids)
    assert set(committed.values()) == {1}


def _safe(fn):
    try:
        return fn()
    except Exception:
        return 0


def test_a_bridge_copy_is_dropped_and_a_replay_still_emits_the_original(pipeline, sample_path):
    s = pipeline.settings
    codec = Codecs().raw
    ids = produce_raw(s, logins(sample_path, 1))
    worker = pipeline.start("worker", **MASK_ONLY)
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic]) == 0, 120, "the originals masked")
    # The bridge killed between produce and SQS delete: the same envelope again, at a later offset.
    from streams.io.kafka import read_topic

    originals = {k: v for k, v in read_topic(s, s.raw_topic)}
    copies = [(s.raw_topic, k, v) for k, v in list(originals.items())[:10]]
    assert all(codec.decode(v)["message_id"] == k.decode() for _, k, v in copies)
    send_records(s, copies)
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic]) == 0, 120, "the copies read")
    committed = outputs(pipeline)
    assert set(committed) == set(ids) and set(committed.values()) == {1}  # no second output for a copy
    # The dedup changelog holds each written id once, a few per record (one record per
    # partition per transaction; the earlier format wrote one record per id).
    changelog = read_topic(s, f"{s.raw_topic}.mask-dedup")
    remembered = collections.Counter(k.decode() for key, value in changelog for k, _ in decode(key, value))
    assert remembered == collections.Counter(set(ids))
    assert 0 < len(changelog) <= len(ids) // 4

    # A deliberate replay from earliest emits every original again (and still drops the copies).
    assert pipeline.stop(worker) == 0
    replayed = pipeline.wait_for(
        lambda: (r := pipeline.run("replay", "mask", "--to", "earliest")).returncode == 0 and r, 60, "replay"
    )
    assert replayed.returncode == 0
    pipeline.start("worker", **MASK_ONLY)
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic]) == 0, 120, "the replay")
    committed = outputs(pipeline)
    assert set(committed) == set(ids) and set(committed.values()) == {2}


def test_the_dedup_window_is_restored_whole_or_not_at_all(pipeline):
    """A partial window lets bridge copies through: restoring it raises (the stage retries)
    unless every assigned partition was read to its end (a broker restart used to leave a
    newly assigned partition with no window at all, and copies went out)."""
    s = pipeline.settings
    window = DedupWindow(s)
    with pytest.raises(TransientError):  # no changelog topic (yet): not an empty window
        window.load({0})
    ensure_topics(s)

    def loaded():
        try:
            return window.load({0, 1})
        except TransientError:  # a new topic's leaders may still be elected
            return None

    assert pipeline.wait_for(loaded, 60, "the new changelog read") == {0: [], 1: []}
    with pytest.raises(TransientError):  # a partition the changelog does not have
        window.load({0, s.topic_partitions})


def test_a_commit_that_answers_too_late_keeps_its_ids_in_the_window(pipeline, sample_path):
    """A commit whose answer outlives STREAMS_COMMIT_TIMEOUT is in doubt: the producer is
    replaced and the batch read again, but the broker committed it. Its ids must stay in the
    dedup window (read back from the changelog), or their bridge copies go out a second time."""
    from streams.io.kafka import read_topic

    s = pipeline.settings
    ids = produce_raw(s, logins(sample_path, 3))
    env = {**MASK_ONLY, "STREAMS_COMMIT_TIMEOUT": "1", "STREAMS_FAULT": "mask_after_commit@1:stall"}
    pipeline.start("worker", **env)
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic]) == 0, 120, "the originals masked")
    pipeline.wait_for(lambda: "replacing the producer" in pipeline.logs(), 60, "the late commit replaced")
    copies = [(s.raw_topic, k, v) for k, v in read_topic(s, s.raw_topic)]
    send_records(s, copies)
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic]) == 0, 120, "the copies read")
    committed = outputs(pipeline)
    assert set(committed) == set(ids) and set(committed.values()) == {1}


def test_a_restarted_worker_drops_copies_of_what_its_previous_life_wrote(pipeline, sample_path):
    """The window is restored per raw partition from the changelog: each changelog record must
    sit in its raw partition's changelog partition (a record placed by its key, as a batch
    once was, restored into another partition's window, and the copies went out)."""
    from streams.io.kafka import read_topic

    s = pipeline.settings
    ids = produce_raw(s, logins(sample_path, 3))
    worker = pipeline.start("worker", **MASK_ONLY)
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic]) == 0, 120, "the originals masked")
    assert pipeline.stop(worker) == 0
    send_records(s, [(s.raw_topic, k, v) for k, v in read_topic(s, s.raw_topic)])
    pipeline.start("worker", **MASK_ONLY)
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic]) == 0, 120, "the copies read")
    committed = outputs(pipeline)
    assert set(committed) == set(ids) and set(committed.values()) == {1}


def test_a_sink_transaction_aborted_while_the_next_batch_is_written_commits_nothing_past_it(pipeline):
    """Issue 20: the sink writes batch N+1's rows while batch N's Kafka transaction commits.
    Batch 2's transaction (its dead letters produced) hangs past STREAMS_COMMIT_TIMEOUT and is
    aborted (its producer replaced) while batch 3's rows are written: meanwhile no offset past
    batch 2's start is committed; then both are read again, and every row and dead letter lands once."""
    from tests.factories import masked_value

    s = pipeline.settings
    ensure_topics(s)
    good, bad, records = [], [], []
    for i in range(400):
        if i % 5:  # four rows, then an over-long message id: a sink dead letter in (nearly) every batch
            good.append(f"ok-{i:03d}")
            records.append((s.masked_topic, good[-1].encode(), masked_value(good[-1])))
        else:
            long_id = f"bad-{i:03d}-" + "x" * 200
            bad.append(long_id[:128])  # the dead letter's key: the id cut to 128 characters
            records.append((s.masked_topic, f"bad-{i:03d}".encode(), masked_value(long_id)))
    send_records(s, records)
    where = dict(records_of(s, s.masked_topic, "read_uncommitted"))  # message id -> (partition, offset)
    worker = pipeline.start(
        "worker",
        STREAMS_STAGES="sink",
        STREAMS_BATCH_SIZE="50",
        STREAMS_COMMIT_TIMEOUT="5",
        STREAMS_FAULT="sink_after_commit@2:stall",
        STREAMS_LOG_LEVEL="info",
    )

    def committed() -> dict[int, int]:
        return {p: c for (_, p), (c, _) in group_lag(s, [s.masked_topic]).items()}

    def writes_past(offsets: dict[int, int]) -> int:
        """Database transactions (a batch's rows share one xmin) that wrote rows past ``offsets``."""
        rows = pipeline.query("SELECT message_id, xmin::text AS tx FROM user_logins")
        past = {r["tx"] for r in rows if where[r["message_id"]][1] >= offsets.get(where[r["message_id"]][0], 0)}
        return len(past)

    pipeline.wait_for(
        lambda: "fault injected at sink_after_commit (stall)" in pipeline.log_of(worker), 120, "batch 2's transaction"
    )
    first = committed()  # batch 1's; batch 2's transaction hangs
    # Batch 2's rows and a later batch's are written while the offsets stay where batch 1 left them.
    pipeline.wait_for(lambda: writes_past(first) >= 2 and committed() == first, 20, "batch 3's rows meanwhile")
    pipeline.wait_for(lambda: "replacing the producer" in pipeline.log_of(worker), 60, "batch 2's transaction aborted")
    pipeline.wait_for(lambda: pipeline.lag([s.masked_topic]) == 0, 120, "everything committed after the abort")
    rows = [r["message_id"] for r in pipeline.query("SELECT message_id FROM user_logins")]
    assert sorted(rows) == good
    dead = message_ids(s, s.dlq_topic, "read_committed")
    assert dead == collections.Counter(bad)  # each dead letter once, none lost with the aborted transaction
    assert sum(message_ids(s, s.dlq_topic, "read_uncommitted").values()) > len(bad)  # the aborted ones were there
    assert worker.poll() is None

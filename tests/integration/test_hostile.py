"""The hostile-input catalogue through the real bridge and mask agent (docs/delivery.md).

Every entry either becomes exactly one row by a documented rule or exactly one dead
letter with its specific reason code, and none stops a worker.
"""

from __future__ import annotations

import json
import time

import pytest

from streams.io.kafka import send_records
from streams.ops.topics import ensure_topics
from streams.privacy.masking import canonical_ip

pytestmark = pytest.mark.integration

BASE = {
    "user_id": "h",
    "app_version": "1.2.3",
    "device_type": "ios",
    "ip": "192.0.2.10",
    "locale": "EN",
    "device_id": "d-1",
}


def obj(**changes) -> str:
    return json.dumps({k: v for k, v in {**BASE, **changes}.items() if v is not ...}, ensure_ascii=False)


SQS_LIMIT = 262_144  # bytes: the largest body SQS accepts
_padded = obj(user_id="big", pad="")
AT_LIMIT = _padded[:-2] + "x" * (SQS_LIMIT - len(_padded)) + '"}'

# (name, body sent through SQS, expected reason code or None for a row)
CATALOGUE = [
    ("whitespace body", " \n\t ", "empty_body"),
    ("null", "null", "not_an_object"),
    ("empty array", "[]", "not_an_object"),
    ("bare string", '"hello"', "not_an_object"),
    ("truncated json", obj()[:-5], "invalid_json"),
    ("trailing comma", obj()[:-1] + ",}", "invalid_json"),
    ("single quotes", obj().replace('"', "'"), "invalid_json"),
    ("NaN", obj()[:-1] + ', "score": NaN}', "invalid_json"),
    ("1e400 as a field", obj()[:-1].replace('"1.2.3"', "1e400") + "}", "wrong_type"),
    ("deep nesting", "[" * 100_000 + "]" * 100_000, "too_deep"),
    ("deep object inside", obj()[:-1] + ', "x": ' + "[" * 70 + "]" * 70 + "}", "too_deep"),
    ("wrong type", obj(app_version=2), "wrong_type"),
    ("missing field", obj(device_id=...), "missing_field"),
    ("null required field", obj(ip=None), "null_field"),
    ("empty required field", obj(user_id="  "), "empty_field"),
    ("NUL character", obj(device_type="io\u0000s"), "nul_character"),
    ("lone surrogate", obj(user_id="a").replace('"a"', '"a\\ud800"'), "invalid_unicode"),
    ("duplicate keys", obj()[:-1] + ', "ip": "192.0.2.11"}', "duplicate_key"),
    ("too long for its column", obj(device_type="x" * 33), "field_too_long"),
    # Rows: text is stored exactly as sent; unknown extra fields are ignored.
    ("unknown extra fields", obj(user_id="extra", colour="blue", nested={"a": [1, 2]}), None),
    ("body at the SQS size limit", AT_LIMIT, None),
    ("emoji, RTL, zero-width", obj(user_id="😀\u202eabc\u200b\u200dزهرة"), None),
    ("sql-looking", obj(user_id="'; DROP TABLE user_logins; --", locale="%s"), None),
    ("dollars and backslashes", obj(user_id="$$ $1 \\ \\\\ \\x00", device_type="a\\nb"), None),
    ("null locale", obj(user_id="nolocale", locale=None), None),
    ("ipv6 loopback", obj(user_id="v6-1", ip="::1"), None),
    ("ipv6 zone id", obj(user_id="v6-2", ip="fe80::1%eth0"), None),
    ("ipv4-mapped", obj(user_id="v6-3", ip="::ffff:192.0.2.1"), None),
    ("plain ipv4 of the mapped one", obj(user_id="v4-3", ip="192.0.2.1"), None),
    ("upper-case ipv6", obj(user_id="v6-4", ip="FE80::ABCD"), None),
    ("lower-case ipv6", obj(user_id="v6-5", ip="fe80::abcd"), None),
    ("not an ip at all", obj(user_id="noip", ip="not-an-ip"), None),
]


def envelope(message_id: str, body: str) -> dict:
    return {"message_id": message_id, "sent_at": int(time.time() * 1000), "body": body, "attributes": {}}


def produce_raw(p, records: list[tuple[bytes | None, bytes]]) -> None:
    send_records(p.settings, [(p.settings.raw_topic, key, value) for key, value in records])


def test_hostile_catalogue(pipeline):
    p = pipeline
    s = p.settings
    ensure_topics(s)
    ids = p.send([body for _, body, _ in CATALOGUE])
    expected_dead = {i: reason for i, (_, _, reason) in zip(ids, CATALOGUE, strict=False) if reason}
    expected_rows = {i: json.loads(body) for i, (_, body, reason) in zip(ids, CATALOGUE, strict=False) if not reason}

    # Straight onto the raw topic: bytes that are not an envelope, an empty body, and
    # the same message id twice, twice in one batch, and with different content.
    raw = p.codecs.raw
    junk = [(b"junk-1", b"\xff\xfe\x00not avro"), (b"junk-2", b"\xc3\x01" + b"\x00" * 3), (None, b"\x80\x81")]
    first, changed = obj(user_id="dup-first"), obj(user_id="dup-second")
    dups = [
        (b"dup-a", raw.encode(envelope("dup-a", first))),
        (b"dup-a", raw.encode(envelope("dup-a", first))),  # twice in one batch
        (b"dup-b", raw.encode(envelope("dup-b", first))),
        (b"empty", raw.encode(envelope("empty", ""))),
    ]
    produce_raw(p, junk + dups)

    p.start("bridge")
    worker = p.start("worker")
    p.wait_for(lambda: p.row_count() == len(expected_rows) + 2, 120, "the catalogue's rows")
    produce_raw(
        p, [(b"dup-a", raw.encode(envelope("dup-a", first))), (b"dup-b", raw.encode(envelope("dup-b", changed)))]
    )
    p.wait_for(lambda: p.lag([s.raw_topic, s.masked_topic]) == 0 and p.queue_depth() == 0, 120, "a drained pipeline")
    assert worker.poll() is None

    rows = {r["message_id"]: r for r in p.query("SELECT * FROM user_logins")}
    assert set(rows) == set(expected_rows) | {"dup-a", "dup-b"}
    for message_id, sent in expected_rows.items():
        row = rows[message_id]
        assert (row["user_id"], row["device_type"], row["locale"]) == (
            sent["user_id"],
            sent["device_type"],
            sent["locale"],
        )
        assert row["app_version_raw"] == sent["app_version"]
    assert rows["dup-a"]["user_id"] == "dup-first"
    # A later raw record of an id already masked is a bridge copy: dropped within the dedup
    # window (issue 18), so the first record of an id wins.
    assert rows["dup-b"]["user_id"] == "dup-first"

    by_user = {r["user_id"]: r for r in rows.values()}
    assert by_user["v6-3"]["masked_ip"] == by_user["v4-3"]["masked_ip"]  # mapped IPv6 folds to IPv4
    assert by_user["v6-4"]["masked_ip"] == by_user["v6-5"]["masked_ip"]  # case does not matter
    assert by_user["v6-2"]["masked_ip"] != by_user["v6-5"]["masked_ip"]
    assert canonical_ip("fe80::1%eth0") == ("fe80::1%eth0", True)
    assert [by_user[u]["ip_is_valid"] for u in ("v6-1", "v6-2", "v6-3", "noip")] == [True, True, True, False]

    dead = p.dead_letters()
    counted = {}
    for d in dead:
        counted.setdefault(d["message_id"], []).append(d["reason"])
    for message_id, reason in expected_dead.items():
        assert counted.pop(message_id) == [reason], message_id
    assert counted.pop("empty") == ["empty_body"]
    assert counted.pop("junk-1") == counted.pop("junk-2") == ["undecodable_record"]
    assert [reasons for reasons in counted.values()] == [["undecodable_record"]]  # the keyless junk record
    for d in dead:
        assert "192.0.2" not in d["detail"] and "d-1" not in d["detail"]

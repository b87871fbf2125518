"""The compiled mask core (streams_core) against the Python reference, byte for byte.

The core path is ``MaskTransform.batch`` with the core loaded; the reference is the same
transform without it, one record at a time. With ``STREAMS_REQUIRE_CORE=1`` (make test,
make unit, CI) a core that is not built fails these tests instead of skipping them: a
comparison of the reference with itself would prove nothing.
"""

from __future__ import annotations

import hmac
import json
import random
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams import metrics
from streams.errors import ConfigError
from streams.io.codec import Codecs
from streams.pipeline.bridge import envelope
from streams.pipeline.mask import MaskTransform, Output
from streams.privacy import core as mask_core
from streams.privacy.keys import generate_document, parse_keyring
from streams.privacy.ledger import ERASED, ErasedUsers
from streams.privacy.masking import Masker, canonical_ip
from tests.helpers import core_module
from tests.integration.test_hostile import CATALOGUE

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
CODECS = Codecs()
KEYRING = parse_keyring((GOLDEN / "keys.json").read_text(), "golden")


def _core_transform(keyring=KEYRING) -> MaskTransform:
    transform = MaskTransform(Masker(keyring), CODECS)
    if transform.core is None:  # reached only without STREAMS_REQUIRE_CORE=1: load() raises then
        pytest.skip("streams_core is not built (make install); STREAMS_REQUIRE_CORE=1 makes this a failure")
    return transform


def _comparable(out: Output) -> tuple:
    """An output without the dead letter's clock (``failed_at``)."""
    if out.reason is None or out.reason == ERASED:  # no dead letter: compared as it is
        return out.key, out.value, out.reason
    dead = CODECS.dead_letter.decode(out.value)
    dead.pop("failed_at")
    return out.key, json.dumps(dead, sort_keys=True, default=repr), out.reason


def _assert_same(core: MaskTransform, reference: MaskTransform, messages: list) -> None:
    got = core.batch(messages)
    expected = [reference(key, value, where) for key, value, where in messages]
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert _comparable(a) == _comparable(b), f"record {i} of the batch differs"


# --- the golden corpus -------------------------------------------------------------------


def test_core_matches_golden_corpus_byte_for_byte():
    transform = _core_transform()
    cases = [json.loads(line) for line in (GOLDEN / "corpus.jsonl").read_text().splitlines()]
    messages = [
        (bytes.fromhex(c["key"]) if c["key"] is not None else None, bytes.fromhex(c["value"]), f"golden/0/{i}")
        for i, c in enumerate(cases)
    ]
    outputs = transform.batch(messages)
    for i, (case, out) in enumerate(zip(cases, outputs, strict=True)):
        assert out.key.hex() == case["out_key"], i
        assert out.reason == case["reason"], i
        if out.reason:
            dead = CODECS.dead_letter.decode(out.value)
            dead.pop("failed_at")
            dead["payload"] = dead["payload"].hex()
            assert dead == case["dead_letter"], i
        else:
            assert out.value.hex() == case["out_value"], i
    # The core parsed and masked the plain records; the rest (dead letters, IPv6, non-ASCII) the reference read.
    assert transform.core_masked > 250 and transform.core_masked + transform.core_declined == len(cases)


# --- a property test: batches of 1,000 records, hostile ones included ---------------------

BATCH = 1_000
EXAMPLES = 100  # 100,000 records in all
_SEEN: list[int] = []

_WEIRD = [
    "é",
    "ß",
    "✓",
    "日本",
    "\U0001f600",
    " ",
    "\t",
    "\u00a0",
    "\u2028",
    "%",
    ":",
    ".",
    "\\",
    '"',
    "١",
    "\ufeff",
    "\x7f",
]
_ESCAPES = ["\\u0000", "\\ud800", "\\udfff", "\\ud83d\\ude00", "\\n", "\\u00e9", '\\"', "\\\\", "\\/"]


def _ipv6(rng: random.Random) -> str:
    """An IPv6 address in some written form: zero runs, either case, leading zeros, `::` anywhere."""
    hextets = [rng.choice([0, 0, 1, 0xFFFF, rng.getrandbits(16)]) for _ in range(8)]
    if rng.random() < 0.2:
        hextets[:6] = [0, 0, 0, 0, 0, 0xFFFF]  # IPv4-mapped, written in hex
    parts = [rng.choice(["{:x}", "{:X}", "{:04x}", "{:01x}"]).format(h) for h in hextets]
    if rng.random() < 0.6:
        i = rng.randrange(8)
        j = rng.randrange(i, 9)
        parts = parts[:i] + [""] + parts[j:]
        text = ":".join(parts)
        text = ("" if i else ":") + text + ("" if j < 8 else ":")
        text = text.replace(":::", "::")
    else:
        text = ":".join(parts)
    return text


_IPV6_EDGES = [
    "1:2:3:4:5:6:7::",
    "1:2:3:4:5:6:7:8::",
    "::1:2:3:4:5:6:7:8",
    ":1::2",
    "1:::2",
    "12345::1",
    "g::1",
    "1:2:3:4:5:6:7:8:9",
    "::0:0:0:0:0:0:0",
    "1::2::3",
    "1:2",
    ":",
    "::",
    "1:2:3:4:5:6:7",
    "::ffff:0:0",
    "::fffe:1:2",
    "0:0:0:0:0:ffff:1:2",
    "1::/64",
]


def _ip(rng: random.Random, text: str) -> str:
    octet = lambda: str(rng.randrange(256))  # noqa: E731
    return rng.choice(
        [
            f"{octet()}.{octet()}.{octet()}.{octet()}",
            f" {octet()}.{octet()}.{octet()}.{octet()}\n",
            f"0{octet()}.{octet()}.{octet()}.{octet()}",  # a leading zero: not an IP, masked as text
            f"2001:DB8::{rng.getrandbits(16):X}",
            f"2001:db8:0:0:0:0:{rng.getrandbits(16):x}:1",
            f"::ffff:{octet()}.{octet()}.{octet()}.{octet()}",
            f"::FFFF:{octet()}.{octet()}.{octet()}.{octet()}%eth0",
            f"fe80::{rng.getrandbits(16):x}%{text or 'en0'}",
            f"{octet()}.{octet()}.{octet()}",
            f"{octet()}.{octet()}.{octet()}.{octet()}.",
            f"{rng.randrange(250, 1000)}.1.1.1",
            f"1.2.3.{rng.randrange(0, 300)} ",
            "1..2.3",
            _ipv6(rng),
            _ipv6(rng),
            f" {_ipv6(rng)} ",
            rng.choice(_IPV6_EDGES),
            "::1",
            text,
            text * rng.randrange(1, 60),
        ]
    )


def _text(rng: random.Random, drawn: str, plain: bool) -> str:
    size = rng.choice([1, 3, 12, 40, 150, 199, 200, 201, 260])
    weird = " " if plain else rng.choice(_WEIRD)
    parts = [rng.choice([drawn, weird, f"{rng.getrandbits(32):x}", "-"]) for _ in range(size // 4 + 1)]
    return "".join(parts)[:size] or "x"


def _json_str(value: str, rng: random.Random, plain: bool) -> str:
    encoded = json.dumps(value, ensure_ascii=rng.random() < 0.5)
    if not plain and rng.random() < 0.08:  # an escape json.dumps would not write: NUL, lone surrogates, pairs
        encoded = encoded[:-1] + rng.choice(_ESCAPES) + '"'
    return encoded


def _body(rng: random.Random, drawn: str, users: list[str] | None = None) -> str:
    # Half the records plain (ASCII, no escapes: the shape the core parses itself), with
    # edges of that shape: padding, blank and over-long values, near-IPs, odd versions.
    plain = rng.random() < 0.5
    if plain:
        drawn = "".join(c for c in drawn if " " <= c <= "~" and c not in '"\\') or rng.choice(["a", " ", "1.2"])
    fields = {
        "user_id": rng.choice(users) if users else f"u-{rng.getrandbits(40):x}",
        "app_version": rng.choice(
            ["2.3.0", "0.96", "5.0.1", "1.2.3.4", "beta", "99999.1", "2147.483.647", "2147.483.648", "1.1000", "007.08"]
            + ["1.", ".1", "", " 1.2", "1.2.3 ", "99999999999999999999999", "1.2.3." + "9" * 30, drawn]
        ),
        "device_type": rng.choice(["ios", "android", drawn]),
        "ip": _ip(rng, drawn),
        "locale": rng.choice(["EN", "RU", None, "", " ", "x" * 32, "x" * 33, drawn]),
        "device_id": rng.choice([f"{rng.getrandbits(48):012x}", _text(rng, drawn, plain), f" {drawn} "]),
    }
    shape = rng.random()
    if shape < 0.03:
        del fields[rng.choice(list(fields))]
    elif shape < 0.06:
        fields[rng.choice(list(fields))] = rng.choice([None, 7, 1.5, True, [], {}, ""])
    elif shape < 0.08:
        fields["extra"] = {"a": [1, 2, {"b": drawn}]}
    items = [
        f"{json.dumps(k)}: {_json_str(v, rng, plain) if isinstance(v, str) else json.dumps(v)}"
        for k, v in fields.items()
    ]
    rng.shuffle(items)
    if shape > 0.98:  # a repeated key
        items.append(items[0])
    body = "{" + ", ".join(items) + "}"
    if rng.random() < 0.02:
        body = rng.choice([body[: rng.randrange(len(body))], "\ufeff" + body, "[" * 70 + "]" * 70, body + "x"])
    return body


def _record(
    rng: random.Random, drawn: str, i: int, users: list[str] | None = None
) -> tuple[bytes | None, bytes | None, str]:
    kind = rng.random()
    body = rng.choice(CATALOGUE)[1] if kind < 0.03 else _body(rng, drawn, users)
    message_id = f"m-{i}" if rng.random() < 0.94 else rng.choice(["", "x" * 129, f"{drawn}-{i}"])
    raw = {"MessageId": message_id, "Body": body, "Attributes": {"SentTimestamp": str(1_764_000_000_000 + i)}}
    try:
        value: bytes | None = CODECS.raw.encode(envelope(raw))
    except Exception:  # a body Avro cannot carry (not UTF-8): the record as random bytes
        value = rng.randbytes(rng.randrange(0, 40))
    if kind > 0.995:
        value = rng.choice([None, b"", value[: len(value) // 2] if value else b"", b"\x00\x00\x00\x00\x01junk"])
    key = rng.choice([message_id.encode("utf-8", "replace"), None, b"\xff\xfe"])
    return key, value, f"prop/0/{i}"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(seed=st.integers(0, 2**64 - 1), drawn=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=8))
def _core_equals_reference(seed: int, drawn: list[str]) -> None:
    rng = random.Random(seed)
    messages = [_record(rng, rng.choice(drawn), i) for i in range(BATCH)]
    _assert_same(_PAIR[0], _PAIR[1], messages)
    _SEEN.append(len(messages))


_PAIR: list[MaskTransform] = []


def test_core_equals_reference_on_100k_hostile_records():
    _PAIR[:] = [_core_transform(), MaskTransform(Masker(KEYRING), CODECS, use_core=False)]
    _SEEN.clear()
    _core_equals_reference()
    assert sum(_SEEN) >= 100_000
    core = _PAIR[0]
    assert core.core_masked > 15_000  # the core parsed and masked a good share itself, not handing it back


def test_core_with_every_join_format_and_fresh_keys():
    """Keys as `keys init` makes them, and an older join version (no domain separation)."""
    doc = generate_document()
    older = json.loads(json.dumps(doc))
    older["join"]["domain_separated"] = []
    for document in (doc, older):
        keyring = parse_keyring(json.dumps(document), "test")
        rng = random.Random(3)
        messages = [_record(rng, "zz", i) for i in range(500)]
        _assert_same(_core_transform(keyring), MaskTransform(Masker(keyring), CODECS, use_core=False), messages)


# --- declines, fallback and the require flag -----------------------------------------------


def test_declined_values_go_to_the_reference_and_are_counted(monkeypatch):
    transform = _core_transform()
    core = transform.core
    assert core is not None
    real = core.mask

    def declining(field: str, canonicals: list[str]):
        tokens, ciphertexts = real(field, canonicals)
        return tokens, [None if i % 3 == 0 else c for i, c in enumerate(ciphertexts)]

    monkeypatch.setattr(core, "mask", declining)
    rng = random.Random(11)
    messages = [_record(rng, "q", i) for i in range(300)]
    before = metrics.MASK_CORE_DECLINED._value.get()
    _assert_same(transform, MaskTransform(Masker(KEYRING), CODECS, use_core=False), messages)
    assert transform.core_declined > 50
    assert metrics.MASK_CORE_DECLINED._value.get() - before == transform.core_declined


def test_without_the_extension_the_reference_is_used_or_it_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "streams_core", None)  # import streams_core raises ImportError
    masker = Masker(KEYRING)
    assert mask_core.load(masker, require=False) is None
    assert metrics.MASK_CORE._value.get() == 0
    with pytest.raises(ConfigError) as refused:
        mask_core.load(masker, require=True)
    assert "STREAMS_REQUIRE_CORE=1" in str(refused.value) and "\n" not in str(refused.value)
    monkeypatch.setenv("STREAMS_REQUIRE_CORE", "1")
    with pytest.raises(ConfigError):
        MaskTransform(masker, CODECS)
    monkeypatch.setenv("STREAMS_REQUIRE_CORE", "yes")
    with pytest.raises(ConfigError, match="must be 1 or 0"):
        mask_core.core_required()


def test_a_core_that_disagrees_with_the_reference_is_not_used(monkeypatch):
    streams_core = core_module()

    class WrongMac:  # a token scheme that is not the reference's (no domain prefix)
        def __init__(self, key: bytes, prefix: bytes) -> None:
            self._mac = streams_core.Mac(key, b"")

        def tokens(self, head, values):
            return self._mac.tokens(head, values)

    wrong = type(sys)("streams_core")
    wrong.Mac, wrong.Siv, wrong.parse_logins = WrongMac, streams_core.Siv, streams_core.parse_logins
    monkeypatch.setitem(sys.modules, "streams_core", wrong)
    assert mask_core.load(Masker(KEYRING), require=False) is None
    with pytest.raises(ConfigError, match="differ from the reference"):
        mask_core.load(Masker(KEYRING), require=True)


# --- the primitives, against the libraries the reference uses ------------------------------


def test_primitives_match_hmac_and_cryptography_aes_siv():
    streams_core = core_module()
    rng = random.Random(5)
    keys = [rng.randbytes(64), rng.randbytes(32), rng.randbytes(64)]
    values = [rng.randbytes(rng.randrange(0, 600)) for _ in range(200)]
    mac_key, prefix = rng.randbytes(32), b"ip\0h2\0"
    digests = streams_core.Mac(mac_key, prefix).digests(values)
    assert digests == [hmac.digest(mac_key, prefix + v, "sha256") for v in values]
    index = [rng.randrange(len(keys)) for _ in values]
    each = [rng.randbytes(rng.randrange(0, 50)) for _ in values]
    sealed = streams_core.Siv(keys).seal(index, values, 0, [b"shared", b""], each)
    assert sealed == [
        AESSIV(keys[k]).encrypt(v, [b"shared", b"", e]) for k, v, e in zip(index, values, each, strict=True)
    ]
    # Declined, never raised: a lone surrogate, a value too long for the pad, an unknown key index.
    out = streams_core.Siv(keys).seal([0, 0, 9], ["\ud800", "x" * 70_000, "ok"], 256, [b"a"])
    assert out == [None, None, None]
    assert streams_core.Mac(mac_key, b"").tokens("h.", ["\udfff", "a"])[0] is None


@settings(max_examples=400, deadline=None, database=None)
@given(
    key=st.sampled_from([32, 64]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    plaintexts=st.lists(st.binary(max_size=100), min_size=1, max_size=4),
    shared=st.lists(st.binary(max_size=40), max_size=5),
    each=st.binary(max_size=70),
)
def test_core_aes_siv_is_cryptographys_for_any_sizes(key, plaintexts, shared, each):
    """The core's AES-SIV (RustCrypto's aes-siv crate, one cipher object per key) against
    cryptography's (OpenSSL): every plaintext length around the 16-byte block
    (the S2V xorend and pad cases), 0 to 6 associated-data items, both key sizes; one key
    object sealing several values in turn."""
    got = core_module().Siv([key]).seal(0, plaintexts, 0, shared, [each] * len(plaintexts))
    assert got == [AESSIV(key).encrypt(p, [*shared, each]) for p in plaintexts]


def test_core_composes_an_associated_data_item_from_parts():
    """``ad_parts``: constant bytes parts and per-value list parts (str as UTF-8, bytes)
    concatenated into one item, the same bytes as that item given whole; a ``None`` or a lone
    surrogate in a list part declines that value only; a part of another length is an error."""
    streams_core = core_module()
    key = bytes(range(64))
    users = ["u-1", "ü-✓", "\ud800", "x" * 128, "u-5"]
    tokens = ["g1.a", "g1.b", "g1.c", None, "g1.e"]
    values = [b"1", b"22", b"333", b"4444", b""]
    got = streams_core.Siv([key]).seal(0, values, 0, [b"s"], ad_parts=[b"head\0", users, b"\0mid\0", tokens])
    expected = [
        AESSIV(key).encrypt(v, [b"s", b"head\0" + u.encode() + b"\0mid\0" + t.encode()])
        for v, u, t in zip(values[:2], users[:2], tokens[:2], strict=True)
    ]
    expected += [None, None, AESSIV(key).encrypt(b"", [b"s", b"head\0u-5\0mid\0g1.e"])]
    assert got == expected
    with pytest.raises(ValueError):
        streams_core.Siv([key]).seal(0, values, 0, [], ad_parts=[users[:2]])
    with pytest.raises(ValueError):
        streams_core.Siv([key]).seal(0, values, 0, [], [b"a"] * 5, ad_parts=[b"x"])


def test_core_aes_siv_takes_126_associated_data_items_and_declines_more():
    streams_core = core_module()
    key = bytes(range(64))
    ads = [bytes([i]) for i in range(126)]
    assert streams_core.Siv([key]).seal(0, [b"value"], 0, ads[:-1], [ads[-1]]) == [AESSIV(key).encrypt(b"value", ads)]
    assert streams_core.Siv([key]).seal(0, [b"value"], 0, ads, [b"one more"]) == [None]


def test_core_parser_reads_ips_as_ipaddress_does():
    """50,000 written forms of IPv4 and IPv6 addresses (and near misses) through the core's
    parser: each is declined or canonicalised exactly as ``canonical_ip`` does."""
    transform = _core_transform()
    assert transform.core is not None
    rng = random.Random(17)
    texts = [rng.choice([_ipv6(rng), _ip(rng, "x:y"), rng.choice(_IPV6_EDGES)]) for _ in range(50_000)]
    values = [
        CODECS.raw.encode(
            envelope(
                {
                    "MessageId": f"m-{i}",
                    "Body": json.dumps({"user_id": "u", "device_type": "ios", "ip": text, "locale": None})[:-1]
                    + ', "device_id": "d", "app_version": "1.0"}',
                    "Attributes": {"SentTimestamp": "1764000000000"},
                }
            )
        )
        for i, text in enumerate(texts)
    ]
    parsed = transform.core.parse(values)
    read = 0
    for text, fields in zip(texts, parsed, strict=True):
        if fields is not None:
            read += 1
            assert (fields[4], fields[5]) == canonical_ip(text), text
    assert read > 25_000  # most forms are read by the core (dotted IPv6 and scope ids are declined)


def test_with_a_registry_the_core_reads_both_wire_formats():
    """A worker with a schema registry reads Confluent-format records and single-object
    ones (written before the switch); the core parses both, and writes what the reference does."""
    from tests.unit.test_registry_codec import codecs_with, registered

    codecs = codecs_with(registered())
    transform = MaskTransform(Masker(KEYRING), codecs)
    if transform.core is None:
        pytest.skip("streams_core is not built (make install); STREAMS_REQUIRE_CORE=1 makes this a failure")
    reference = MaskTransform(Masker(KEYRING), codecs, use_core=False)
    rng = random.Random(23)
    plain = [CODECS.raw.encode(envelope(_plain_login(rng, i))) for i in range(400)]
    confluent = [codecs.raw.header + v[10:] for v in plain[:200]]
    messages = [(None, v, f"r/0/{i}") for i, v in enumerate(confluent + plain[200:])]
    got = transform.batch(messages)
    assert got == [reference(k, v, w) for k, v, w in messages]
    assert got[0].value[:1] == b"\x00" and transform.core_masked == 400 and transform.core_declined == 0


def _plain_login(rng: random.Random, i: int) -> dict:
    body = {
        "user_id": f"u{i}",
        "app_version": "2.3.0",
        "device_type": "ios",
        "ip": f"10.0.{rng.randrange(256)}.{i % 256}" if i % 3 else f"2001:db8::{i:x}",
        "locale": "EN",
        "device_id": f"{rng.getrandbits(48):012x}",
    }
    return {
        "MessageId": f"m-{i}",
        "Body": json.dumps(body),
        "Attributes": {"SentTimestamp": str(1_764_000_000_000 + i)},
    }


def test_primitives_seal_the_per_user_scheme_byte_for_byte():
    """The per-user key mode (masking.join_token / pad_field / associated / seal) from the same
    primitives: one key per user (an index per record), one associated-data item per value."""
    from streams.privacy.masking import associated, join_token, pad_field, seal

    streams_core = core_module()
    rng = random.Random(29)
    user_keys = [rng.randbytes(64) for _ in range(7)]
    join_key = rng.randbytes(32)
    users = [rng.randrange(len(user_keys)) for _ in range(300)]
    values = [rng.choice([f"10.0.0.{i % 256}", f"2001:db8::{i:x}", "é" * (i % 60)]) for i in range(300)]
    digests = streams_core.Mac(join_key, b"ip\0h2\0").digests(values)
    assert digests == [join_token(join_key, b"ip", b"h2", v.encode()) for v in values]
    key_id = rng.randbytes(8)
    tokens = streams_core.Mac(join_key, b"ip\0h2\0").tokens("h2.", values)
    ads = [associated(b"ip", f"u{u}".encode(), key_id, t.encode()) for u, t in zip(users, tokens, strict=True)]
    padded = [pad_field("ip", v.encode()) for v in values]
    sealed = streams_core.Siv(user_keys).seal(users, padded, 0, [], ads)
    assert sealed == [seal(user_keys[u], p, a) for u, p, a in zip(users, padded, ads, strict=True)]
    # The core pads to pad_field's sizes itself and puts each value's prefix (format byte, key id) first.
    prefixes = [bytes((3,)) + rng.randbytes(8) for _ in values]
    for field in ("ip", "device_id"):
        sizes = mask_core._PAD_SIZES[field]
        texts = [*values, "x" * 46, "x" * 47, "d" * 94, "d" * 95, "d" * 206, "d" * 207, "设" * 200]
        each = [*prefixes, *prefixes[: len(texts) - len(values)]]
        index = [*users, *users[: len(texts) - len(values)]]
        ad = [*ads, *ads[: len(texts) - len(values)]]
        got = streams_core.Siv(user_keys).seal(index, texts, sizes, [], ad, None, each)
        assert got == [
            p + seal(user_keys[u], pad_field(field, t.encode()), a)
            for u, t, a, p in zip(index, texts, ad, each, strict=True)
        ]
    # Over the largest size (the reference refuses it): declined, never raised.
    assert streams_core.Siv(user_keys).seal(0, ["d" * 815], mask_core._PAD_SIZES["ip"], [], [b"a"]) == [None]


# --- per-user key mode: SealingMaskTransform.batch against its reference ------------------

SEAL_JOIN = {"ip": bytes(range(32)), "device_id": bytes(range(100, 132))}


class _SeededKms:
    """Stands in for the KMS a Lifetime asks for its key: the same lifetime keys for the same seed."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def arn(self) -> str:
        return "arn:aws:kms:us-east-1:123456789012:key/test"

    def _call(self, operation: str, **kwargs):
        assert operation == "generate_data_key"
        return {"Plaintext": self._rng.randbytes(kwargs["NumberOfBytes"]), "CiphertextBlob": self._rng.randbytes(24)}


def _user_masker(seed: int, max_users: int, core_wrapping: bool = False):
    """A UserMasker whose lifetime keys, key ids and data keys depend only on ``seed``; its
    lifetime wraps new data keys on the compiled core with ``core_wrapping``."""
    from streams.privacy.masking import UserMasker
    from streams.privacy.user_keys import Lifetime

    wrapping = mask_core.load_key_wrapping() if core_wrapping else None
    lifetime = Lifetime(
        _SeededKms(seed), "dep", max_users, random_bytes=random.Random(seed + 1).randbytes, wrapping=wrapping
    )
    return UserMasker(SEAL_JOIN, "g1", lifetime)


def _sealing_pair(seed: int = 7, max_users: int = 1_000, erased=None, codecs: Codecs = CODECS):
    """(core, reference): two sealing transforms with the same keys, the first on the compiled core."""
    from streams.pipeline.mask import SealingMaskTransform

    core = SealingMaskTransform(_user_masker(seed, max_users, core_wrapping=True), codecs, erased)
    if (
        core.core is None or core.masker.lifetime._kek_core is None
    ):  # reached only without STREAMS_REQUIRE_CORE=1: load_sealing() raises then
        pytest.skip("streams_core is not built (make install); STREAMS_REQUIRE_CORE=1 makes this a failure")
    reference = SealingMaskTransform(_user_masker(seed, max_users), codecs, erased, use_core=False)
    assert reference.core is None
    return core, reference


def _assert_same_sealed(core, reference, messages: list) -> list[Output]:
    """Same outputs, and the same data keys made and queued for the key store, in the same order."""
    got = core.batch(messages)
    expected = [reference(key, value, where) for key, value, where in messages]
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert _comparable(a) == _comparable(b), f"record {i} of the batch differs"
    assert core.masker.lifetime.take() == reference.masker.lifetime.take()
    return got


def test_sealing_core_matches_the_reference_on_the_golden_corpus():
    core, reference = _sealing_pair()
    cases = [json.loads(line) for line in (GOLDEN / "corpus.jsonl").read_text().splitlines()]
    messages = [
        (bytes.fromhex(c["key"]) if c["key"] is not None else None, bytes.fromhex(c["value"]), f"golden/0/{i}")
        for i, c in enumerate(cases)
    ]
    outputs = _assert_same_sealed(core, reference, messages)
    assert [o.reason for o in outputs] == [c["reason"] for c in cases]
    masked = [CODECS.masked.decode(o.value) for o in outputs if o.reason is None]
    assert masked and all(m["ip_sealed"][0] == 3 and m["ip_ciphertext"] == "" for m in masked)
    assert core.core_masked > 250 and core.core_masked + core.core_declined == len(cases)


def _lifetime_rows(seed: int, wrapping, users: list[str], forget: set[str], max_users: int, takes: int):
    """Every (lifetimes, rows) a Lifetime hands out for ``users`` met in order, taken ``takes`` times."""
    from streams.privacy.user_keys import Lifetime

    lifetime = Lifetime(
        _SeededKms(seed), "dep", max_users, random_bytes=random.Random(seed + 1).randbytes, wrapping=wrapping
    )
    out = []
    step = max(1, len(users) // takes)
    for i in range(0, len(users), step):
        for user in users[i : i + step]:
            lifetime.raw_key(user)
        for user in forget:
            lifetime.forget(user)
        out.append(lifetime.take())
    return out


def test_core_key_wrapping_gives_the_reference_rows_byte_for_byte():
    """New data keys wrapped under the lifetime key in one core call per take: the same key
    rows, in the same order, as the reference's one AES-SIV call per key; across lifetimes
    that end mid-batch (max_users), with erased users dropped, and each row opens under its KEK."""
    from streams.privacy.user_keys import wrap_ad

    wrapping = mask_core.load_key_wrapping()
    if wrapping is None:  # reached only without STREAMS_REQUIRE_CORE=1
        pytest.skip("streams_core is not built (make install); STREAMS_REQUIRE_CORE=1 makes this a failure")
    users = [f"u-{n}" for n in range(700)] + ["ü-✓", "x" * 128, "日本", "u-3"]  # "u-3" again: no new key
    for seed, max_users, takes in ((1, 1_000, 1), (2, 97, 7), (3, 5, 40)):
        got = _lifetime_rows(seed, wrapping, users, {"u-10", "u-11"}, max_users, takes)
        expected = _lifetime_rows(seed, None, users, {"u-10", "u-11"}, max_users, takes)
        assert got == expected
        rows = [r for _, batch in got for r in batch.rows()]
        assert {r.user_id for r in rows} == set(users) - {"u-10", "u-11"}  # a user may recur in a later lifetime
        assert {len(r.wrapped_key) for r in rows} == {16 + 64}
    # And it is the scheme: a row opens under its lifetime's KEK with its user's AD.
    from streams.privacy.user_keys import Lifetime

    lifetime = Lifetime(_SeededKms(4), "dep", 10, wrapping=wrapping)
    key_id, key = lifetime.raw_key("u-1")
    (row,) = lifetime.take()[1].rows()
    assert lifetime._kek.decrypt(row.wrapped_key, [wrap_ad("dep", key_id, "u-1")]) == key


def test_a_key_the_core_declines_to_wrap_is_wrapped_by_the_reference():
    class Declines:
        def __init__(self, kek: bytes) -> None:
            self.inner = mask_core.KeyWrapping(core_module(), kek)

        def wrap(self, keys, prefix, users):
            return [None if i % 2 else w for i, w in enumerate(self.inner.wrap(keys, prefix, users))]

    users = [f"u-{n}" for n in range(50)]
    assert _lifetime_rows(5, Declines, users, set(), 1_000, 3) == _lifetime_rows(5, None, users, set(), 1_000, 3)


def test_a_core_that_wraps_otherwise_is_not_used(monkeypatch):
    monkeypatch.setattr(mask_core.KeyWrapping, "wrap", lambda self, keys, prefix, users: [b"x" * 80 for _ in keys])
    assert mask_core.load_key_wrapping(require=False) is None
    with pytest.raises(ConfigError):
        mask_core.load_key_wrapping(require=True)


# --- the key store's binary COPY stream: core against the reference ----------------------

_COPY_ITEMS = st.one_of(st.text(max_size=40), st.binary(max_size=90))


@settings(max_examples=300, deadline=None, database=None)
@given(
    columns=st.integers(1, 4).flatmap(
        lambda width: st.integers(0, 12).flatmap(
            lambda rows: st.lists(st.lists(_COPY_ITEMS, min_size=rows, max_size=rows), min_size=width, max_size=width)
        )
    )
)
def test_core_copy_binary_is_the_reference_byte_for_byte(columns):
    """Text (any Unicode, UTF-8) and bytes columns, empty values and no rows alike."""
    from streams.privacy.user_keys import copy_binary

    assert core_module().copy_binary(columns) == copy_binary(columns)


def test_core_copy_binary_declines_what_the_reference_declines():
    from streams.privacy.user_keys import copy_binary

    streams_core = core_module()
    for columns in (
        [["a", "b"], [b"x"]],  # lists of different lengths
        [["a", "\ud800"]],  # a lone surrogate: no UTF-8 form
        [["a", None]],  # neither str nor bytes
        [[1]],
    ):
        assert copy_binary(columns) is None
        assert streams_core.copy_binary(columns) is None
    stream = streams_core.copy_binary([["ü"], [b"\0\1"]])
    assert (
        stream == b"PGCOPY\n\xff\r\n\0" + bytes(8) + b"\0\x02" + b"\0\0\0\x02\xc3\xbc" + b"\0\0\0\x02\0\1" + b"\xff\xff"
    )


def test_a_core_copy_encoder_that_differs_is_not_used(monkeypatch):
    streams_core = core_module()
    monkeypatch.setattr(streams_core, "copy_binary", lambda columns: b"PGCOPY")
    assert mask_core.load_copy_binary(require=False) is None
    with pytest.raises(ConfigError):
        mask_core.load_copy_binary(require=True)


# A pool of users (so users recur within a batch), some with text only the reference parses.
_SEAL_USERS = [f"u-{n}" for n in range(400)] + ["ü-1", "x" * 128, " u ", "u\u2028", "日本", "u\\\\", 'u"q']
_SEAL_ERASED_AT = 1_764_000_000_500  # records 0..500 of an erased user are dropped, later ones are a new life
_SEAL_PAIR: list = []
_SEAL_SEEN: list[int] = []


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(seed=st.integers(0, 2**64 - 1), drawn=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=8))
def _sealing_core_equals_reference(seed: int, drawn: list[str]) -> None:
    rng = random.Random(seed)
    users = rng.sample(_SEAL_USERS, rng.choice([1, 30, 300]))
    messages = [_record(rng, rng.choice(drawn), i, users) for i in range(BATCH)]
    _assert_same_sealed(_SEAL_PAIR[0], _SEAL_PAIR[1], messages)
    _SEAL_SEEN.append(len(messages))


def test_sealing_core_equals_reference_on_100k_hostile_records():
    """Batches of 1,000 hostile records from a pool of users, a few of them erased, under a
    lifetime that ends every 97 users (so a lifetime ends inside batches): the same bytes
    and the same key rows, in the same order, as the reference one record at a time."""
    erased = ErasedUsers()
    erased.add([(1, user, _SEAL_ERASED_AT) for user in _SEAL_USERS[::9]])
    _SEAL_PAIR[:] = _sealing_pair(seed=11, max_users=97, erased=erased)
    _SEAL_SEEN.clear()
    _sealing_core_equals_reference()
    assert sum(_SEAL_SEEN) >= 100_000
    core, reference = _SEAL_PAIR
    assert core.core_masked > 15_000  # the core parsed and sealed a good share itself
    assert core.masker.lifetime.key_id == reference.masker.lifetime.key_id  # the same lifetimes came and went


def test_sealing_core_declines_go_to_the_reference_and_are_counted(monkeypatch):
    core, reference = _sealing_pair()
    sealer = core.core
    assert sealer is not None
    real = sealer.seal

    def declining(*args):
        return [None if i % 3 == 0 else s for i, s in enumerate(real(*args))]

    monkeypatch.setattr(sealer, "seal", declining)
    rng = random.Random(13)
    messages = [_record(rng, "q", i, _SEAL_USERS[:50]) for i in range(300)]
    before = metrics.MASK_CORE_DECLINED._value.get()
    _assert_same_sealed(core, reference, messages)
    assert core.core_declined > 50
    assert metrics.MASK_CORE_DECLINED._value.get() - before == core.core_declined


def test_sealing_core_drops_an_erased_user_before_making_a_data_key():
    erased = ErasedUsers()
    erased.add([(1, "u-gone", 1_764_000_000_000 + 10)])
    core, reference = _sealing_pair(erased=erased)
    logins = [
        {
            "MessageId": f"m-{i}",
            "Body": json.dumps({**json.loads(_plain_login(random.Random(i), i)["Body"]), "user_id": user}),
        }
        for i, user in enumerate(["u-gone", "u-kept", "u-gone", "u-kept"])
    ]
    messages = [
        (
            None,
            CODECS.raw.encode(envelope({**login, "Attributes": {"SentTimestamp": str(1_764_000_000_000 + i)}})),
            f"t/0/{i}",
        )
        for i, login in enumerate(logins)
    ]
    got = core.batch(messages)
    assert [o.reason for o in got] == [ERASED, None, ERASED, None]
    assert got == [reference(*m) for m in messages]
    assert core.masker.lifetime.take()[1].user_ids == ["u-kept"]  # no key for the erased user
    assert core.core_declined == 0  # parsed by the core, dropped before sealing


def test_sealing_without_the_extension_is_the_reference_or_an_error(monkeypatch):
    from streams.pipeline.mask import SealingMaskTransform

    monkeypatch.setitem(sys.modules, "streams_core", None)
    monkeypatch.delenv("STREAMS_REQUIRE_CORE", raising=False)
    assert mask_core.load_sealing(_user_masker(1, 10), require=False) is None
    assert SealingMaskTransform(_user_masker(1, 10), CODECS).core is None
    monkeypatch.setenv("STREAMS_REQUIRE_CORE", "1")
    with pytest.raises(ConfigError, match="STREAMS_REQUIRE_CORE=1"):
        SealingMaskTransform(_user_masker(1, 10), CODECS)


def test_a_sealing_core_that_disagrees_with_the_reference_is_not_used(monkeypatch):
    streams_core = core_module()

    class WrongSiv:  # seals under the shared associated data only: not the reference's binding
        def __init__(self, keys):
            self._siv = streams_core.Siv(keys)

        def seal(
            self, index, plaintexts, pad_block, ad_shared, ad_each=None, head=None, prefix_each=None, ad_parts=None
        ):
            return self._siv.seal(index, plaintexts, pad_block, [b"other"], ad_each, head, prefix_each, ad_parts)

    wrong = type(sys)("streams_core")
    wrong.Mac, wrong.Siv, wrong.parse_logins = streams_core.Mac, WrongSiv, streams_core.parse_logins
    monkeypatch.setitem(sys.modules, "streams_core", wrong)
    assert mask_core.load_sealing(_user_masker(1, 10), require=False) is None
    with pytest.raises(ConfigError, match="differ from the reference"):
        mask_core.load_sealing(_user_masker(1, 10), require=True)


def test_the_sealing_core_reads_both_wire_formats_with_a_registry():
    from tests.unit.test_registry_codec import codecs_with, registered

    codecs = codecs_with(registered())
    core, reference = _sealing_pair(codecs=codecs)
    rng = random.Random(23)
    plain = [CODECS.raw.encode(envelope(_plain_login(rng, i))) for i in range(400)]
    confluent = [codecs.raw.header + v[10:] for v in plain[:200]]
    messages = [(None, v, f"r/0/{i}") for i, v in enumerate(confluent + plain[200:])]
    got = _assert_same_sealed(core, reference, messages)
    assert got[0].value[:1] == b"\x00" and core.core_masked == 400 and core.core_declined == 0

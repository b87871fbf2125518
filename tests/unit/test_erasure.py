"""Erasure's pure parts: the in-memory ledger, and the mask and sink stages dropping an erased user."""

import datetime as dt
import json

import pytest

from streams.errors import Refused
from streams.io.codec import Codecs
from streams.pipeline.mask import MaskTransform
from streams.pipeline.sink import SinkStage
from streams.privacy.erasure import check_arguments
from streams.privacy.keys import generate_document, parse_keyring
from streams.privacy.ledger import ERASED, ErasedUsers, body_user_id, millis
from streams.privacy.masking import Masker

SENT = dt.datetime(2024, 5, 1, 23, 59, tzinfo=dt.UTC)
ERASED_AT = millis(SENT + dt.timedelta(days=1))
LOGIN = {
    "user_id": "u-gone",
    "app_version": "0.96",
    "device_type": "ios",
    "ip": "10.0.0.7",
    "locale": None,
    "device_id": "111-22-3333",
}
codecs = Codecs()


def raw(body: str, message_id: str = "m-1", sent: dt.datetime = SENT) -> bytes:
    return codecs.raw.encode({"message_id": message_id, "sent_at": sent, "body": body, "attributes": {}})


def ledger() -> ErasedUsers:
    erased = ErasedUsers()
    erased.add([(7, "u-gone", ERASED_AT)])
    return erased


def test_ledger_drops_records_sent_at_or_before_the_erasure_only():
    erased = ledger()
    assert erased.version == 7 and erased
    assert erased.erased("u-gone", ERASED_AT) and erased.erased("u-gone", 0)
    assert not erased.erased("u-gone", ERASED_AT + 1)  # a later login is a new life
    assert not erased.erased("u-kept", 0) and not erased.erased(None, 0)
    assert not ErasedUsers()


def test_a_new_entry_drops_the_mask_cache():
    masker = Masker(parse_keyring(json.dumps(generate_document()), "t"))
    erased = ErasedUsers()
    transform = MaskTransform(masker, codecs, erased)
    transform(b"m-1", raw(json.dumps(LOGIN)), "t/0/0")
    assert masker.mask.cache_info().currsize == 2
    erased.add([(1, "u-gone", ERASED_AT)])
    assert masker.mask.cache_info().currsize == 0


def test_body_user_id_reads_what_it_can():
    assert body_user_id('{"user_id": "u", "app_version": 5}') == "u"
    assert body_user_id('{"user_id": 5}') is None
    assert body_user_id("not json") is None and body_user_id("[1]") is None and body_user_id(None) is None


def test_mask_stage_drops_an_erased_users_record_and_never_dead_letters_it():
    transform = MaskTransform(Masker(parse_keyring(json.dumps(generate_document()), "t")), codecs, ledger())
    assert transform(b"m-1", raw(json.dumps(LOGIN)), "t/0/0") == (b"m-1", b"", ERASED)
    # Invalid otherwise (app_version a number), but the user can be read: dropped, no plaintext copy to the DLQ.
    broken = transform(b"m-2", raw(json.dumps({**LOGIN, "app_version": 5}), "m-2"), "t/0/1")
    assert broken.reason == ERASED and broken.value == b""
    # Sent after the erasure: a new login, masked as usual.
    later = transform(b"m-3", raw(json.dumps(LOGIN), "m-3", SENT + dt.timedelta(days=2)), "t/0/2")
    assert later.reason is None
    # Another user, and a body that names no user, go on as before.
    assert transform(b"m-4", raw(json.dumps({**LOGIN, "user_id": "u-kept"}), "m-4"), "t/0/3").reason is None
    assert transform(b"m-5", raw('{"foo": 1}', "m-5"), "t/0/4").reason == "missing_field"


def test_sink_deletes_instead_of_writing_an_erased_users_record():
    masked = MaskTransform(Masker(parse_keyring(json.dumps(generate_document()), "t")), codecs)
    gone = masked(b"m-1", raw(json.dumps(LOGIN)), "x").value
    kept = masked(b"m-2", raw(json.dumps({**LOGIN, "user_id": "u-kept"}), "m-2"), "x").value
    plan = SinkStage(codecs, ledger()).plan([(b"m-1", gone, "t/0/0"), (b"m-2", kept, "t/0/1")])
    assert [r["message_id"] for r in plan.rows] == ["m-2"] and plan.deletes == ["m-1"] and not plan.dead
    assert "m-1" not in plan.payloads


def test_erase_arguments_hold_no_free_text():
    check_arguments("u-1", "gdpr_art17", "PRIV-123")
    for bad in (("u-1", "the user asked me on the phone", None), ("u-1", "ok", "call Jane Doe"), ("", "ok", None)):
        with pytest.raises(Refused):
            check_arguments(*bad)


class _Writer:
    """What LedgerWatch uses of a stage writer: its lock, its transaction boundaries, the one to pass."""

    def __init__(self) -> None:
        import asyncio

        self.lock = asyncio.Lock()
        self.boundaries = 0
        self.open = False

    def boundary_mark(self) -> int | None:
        return self.boundaries if self.open else None


def test_a_stage_confirms_a_ledger_version_only_past_a_transaction_boundary():
    import asyncio

    from streams.privacy.ledger import LedgerWatch

    async def go() -> None:
        writer, erased = _Writer(), ErasedUsers()
        watch = LedgerWatch("postgresql://unused", "mask", erased, writer)
        assert watch.confirm() == 0
        await watch.apply([(1, "u-a", ERASED_AT)])  # idle: nothing begun under the old ledger
        assert watch.confirm() == 1 and erased.erased("u-a", 0)
        writer.open = True  # a transaction is open: records in it were transformed under version 1
        await watch.apply([(2, "u-b", ERASED_AT)])
        assert erased.erased("u-b", 0) and watch.confirm() == 1
        writer.boundaries += 1  # it committed (or aborted)
        assert watch.confirm() == 2

    asyncio.run(go())


def test_the_batch_path_drops_an_erased_users_record_as_the_reference_does():
    """``batch`` (the compiled core when built) must drop what ``__call__`` drops, before masking."""
    transform = MaskTransform(Masker(parse_keyring(json.dumps(generate_document()), "t")), codecs, ledger())
    messages = [
        (b"m-1", raw(json.dumps(LOGIN)), "t/0/0"),
        (b"m-2", raw(json.dumps({**LOGIN, "app_version": 5}), "m-2"), "t/0/1"),
        (b"m-3", raw(json.dumps(LOGIN), "m-3", SENT + dt.timedelta(days=2)), "t/0/2"),
        (b"m-4", raw(json.dumps({**LOGIN, "user_id": "u-kept"}), "m-4"), "t/0/3"),
    ]
    outputs = transform.batch(messages)
    assert [o.reason for o in outputs] == [ERASED, ERASED, None, None]
    assert outputs == [transform(*m) for m in messages]


def test_the_sealing_transform_drops_an_erased_user_before_making_a_data_key():
    from streams.pipeline.mask import SealingMaskTransform
    from tests.unit.test_user_keys import masker

    sealing = masker()
    transform = SealingMaskTransform(sealing, codecs, ledger())
    assert transform(b"m-1", raw(json.dumps(LOGIN)), "t/0/0").reason == ERASED
    assert transform(b"m-4", raw(json.dumps({**LOGIN, "user_id": "u-kept"}), "m-4"), "t/0/3").reason is None
    assert sealing.lifetime.take()[1].user_ids == ["u-kept"]  # no key for the erased user


def test_an_erasure_drops_the_sealing_transforms_token_cache():
    from streams.pipeline.mask import SealingMaskTransform
    from tests.unit.test_user_keys import masker

    sealing = masker()
    erased = ErasedUsers()
    transform = SealingMaskTransform(sealing, codecs, erased)
    assert transform(b"m-1", raw(json.dumps(LOGIN)), "t/0/0").reason is None
    assert sealing.token.cache_info().currsize > 0  # type: ignore[attr-defined]
    erased.add([(8, "u-gone", ERASED_AT)])
    assert sealing.token.cache_info().currsize == 0  # type: ignore[attr-defined]

"""The compiled core's record encoder against the reference encoding (``AvroCodec.encode``).

Any datum, valid or not: the core's bytes are the reference's wherever it encodes a record,
and it declines (``None``, counted) every record the reference cannot encode, so that
record goes to the reference, which decides it (a dead letter). A build whose encoder
differs is not used, or is an error with ``STREAMS_REQUIRE_CORE=1``.
"""

from __future__ import annotations

import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.errors import ConfigError
from streams.io.codec import Codecs
from streams.pipeline.mask import (
    _MASKED_PROBES,
    _SEALED_PROBES,
    MaskTransform,
    Output,
    _masked_datum,
    _sealed_datum,
)
from streams.privacy import core as mask_core
from streams.privacy.masking import Masker
from tests.helpers import core_module

CODEC = Codecs().masked
SURROGATE = "\ud800"


def datum_args(hostile: bool):
    """Strategies for the datum arguments of ``_masked_datum`` and ``_sealed_datum``: each value of
    its schema type; ``hostile``: sometimes another type, out of range, or a str with no UTF-8 form."""

    def odd(strategy, *others):
        return st.one_of(strategy, st.sampled_from(others)) if hostile else strategy

    text = st.text(max_size=40)
    texts = odd(st.one_of(text, text.map(lambda t: t + SURROGATE)) if hostile else text, None, b"bytes", 7)
    longs = odd(st.integers(-(2**63), 2**63 - 1), 2**63, -(2**63) - 1, True, 1.5, None)
    ints = odd(st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)), 2**31, -(2**31) - 1, False, "1")
    booleans = odd(st.booleans(), 0, 1, None)
    # message_id, sent_at, user_id, device_type, ip, ip_is_valid, device_id, app_version, its number, locale
    fields = st.tuples(texts, longs, texts, texts, texts, booleans, texts, texts, ints, odd(st.none() | text, 3))
    masked = st.tuples(fields, texts, texts, texts, texts)
    sealed_values = st.tuples(texts, odd(st.binary(max_size=80), "text"), texts, st.binary())
    return masked, st.tuples(fields, odd(sealed_values, None))


MASKED, SEALED = datum_args(hostile=True)
MASKED_TYPED, SEALED_TYPED = datum_args(hostile=False)


def reference(datum, args) -> Output | None:
    """What the reference makes of one record's datum arguments; ``None`` where it cannot."""
    try:
        if any(arg is None for arg in args[1:]):  # a value the core's crypto declined: no datum
            raise ValueError
        return Output(args[0][0].encode("utf-8"), CODEC.encode(datum(*args)))
    except Exception:
        return None


def check(encoder: mask_core.RecordEncoder, datum, batch: list[tuple]) -> list[Output | None]:
    """The core's outputs of ``batch``: the reference's bytes wherever it encodes, and
    declined wherever the reference cannot encode (then the reference decides the record)."""
    got, declined = encoder.encode([list(column) for column in zip(*batch, strict=True)], len(batch))
    assert len(got) == len(batch) and declined == got.count(None)
    for out, want in zip(got, (reference(datum, args) for args in batch), strict=True):
        if want is None:
            assert out is None
        elif out is not None:  # declining is always allowed (the reference decides); differing never
            assert out == want and type(out) is Output
    return got


def loaded(datum, probes) -> mask_core.RecordEncoder:
    core_module()
    encoder = mask_core.load_record_encoder(CODEC, datum, probes, Output, require=True)
    assert encoder is not None
    return encoder


EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@EXAMPLES
@given(st.lists(MASKED, min_size=1, max_size=40))
def test_masked_records_are_the_references_bytes_or_declined(batch):
    check(loaded(_masked_datum, _MASKED_PROBES), _masked_datum, batch)


@EXAMPLES
@given(st.lists(SEALED, min_size=1, max_size=40))
def test_sealed_records_are_the_references_bytes_or_declined(batch):
    check(loaded(_sealed_datum, _SEALED_PROBES), _sealed_datum, batch)


@EXAMPLES
@given(st.lists(MASKED_TYPED, min_size=1, max_size=40), st.lists(SEALED_TYPED, min_size=1, max_size=40))
def test_values_of_the_schema_types_are_never_declined(masked, sealed):
    """A decline costs the reference's speed: none without a cause."""
    assert None not in check(loaded(_masked_datum, _MASKED_PROBES), _masked_datum, masked)
    assert None not in check(loaded(_sealed_datum, _SEALED_PROBES), _sealed_datum, sealed)


def test_the_usual_batch_is_encoded_whole_and_declines_are_counted():
    encoder = loaded(_masked_datum, _MASKED_PROBES)
    good = list(_MASKED_PROBES)
    bad = (("m", True, "u", "d", "ip", True, "dev", "1", 1, None), "t", "t", "c", "c")  # a bool for a long
    surrogate = (("m" + SURROGATE, 0, "u", "d", "ip", True, "dev", "1", 1, None), "t", "t", "c", "c")
    batch = [good[0], bad, good[1], surrogate, good[2]]
    got, declined = encoder.encode([list(column) for column in zip(*batch, strict=True)], len(batch))
    assert declined == 2 and got[1] is None and got[3] is None
    assert [got[0], got[2], got[4]] == [reference(_masked_datum, args) for args in good]


def test_an_encoder_that_differs_is_not_used_or_is_an_error(monkeypatch):
    streams_core = core_module()

    class Shifted:  # writes every record with one byte more
        def __init__(self, *args) -> None:
            self._inner = streams_core.RecordEncoder(*args)

        def encode(self, columns, n, make):
            out, declined = self._inner.encode(columns, n, make)
            return [o if o is None else make((o[0], o[1] + b"\0", None)) for o in out], declined

    wrong = type(sys)("streams_core")
    wrong.RecordEncoder = Shifted
    monkeypatch.setitem(sys.modules, "streams_core", wrong)
    assert mask_core.load_record_encoder(CODEC, _masked_datum, _MASKED_PROBES, Output, require=False) is None
    with pytest.raises(ConfigError, match="STREAMS_REQUIRE_CORE=1"):
        mask_core.load_record_encoder(CODEC, _masked_datum, _MASKED_PROBES, Output, require=True)
    del wrong.RecordEncoder  # an older build without the encoder: the same
    assert mask_core.load_record_encoder(CODEC, _masked_datum, _MASKED_PROBES, Output, require=False) is None


def test_both_mask_transforms_encode_in_the_core():
    """The stage's transforms use the encoder (none falls back without a word): the masked
    schema is one it encodes, and a core that is built has it."""
    from tests.unit.test_mask_core import KEYRING, _sealing_pair

    core_module()
    assert MaskTransform(Masker(KEYRING), Codecs())._encoder is not None
    core, _ = _sealing_pair()
    assert core._encoder is not None

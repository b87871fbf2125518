"""The mask stage's produce fast path (streams.pipeline.stages._plain), how a refused record names its input,
and a stage's reading of a batch (the core's one pass against ``read_batch``)."""

from __future__ import annotations

import sys

import pytest
from confluent_kafka import Message
from hypothesis import given
from hypothesis import strategies as st

from streams.errors import ConfigError
from streams.io.codec import CONFLUENT_HEADER_LEN
from streams.pipeline.mask import Output, _fallback_id
from streams.pipeline.stages import _READ_PROBES, _plain, read_batch, stage_input, where
from streams.pipeline.transactions import source_of
from streams.privacy import core as mask_core
from tests.helpers import core_module

_outputs = st.lists(
    st.builds(
        Output,
        st.binary(min_size=1, max_size=40),
        st.binary(max_size=200),
        st.one_of(st.none(), st.sampled_from(["missing_field", "erased", "too_large"])),
    ),
    max_size=30,
)


@given(_outputs, st.integers(0, 260))
def test_a_batch_takes_the_fast_path_only_when_every_record_is_masked_and_fits(outputs, limit):
    if _plain(outputs, limit):
        assert all(out.reason is None and len(out.key) + len(out.value) <= limit for out in outputs)


@given(_outputs)
def test_a_batch_of_masked_records_under_a_large_limit_takes_the_fast_path(outputs):
    masked = [Output(out.key, out.value) for out in outputs]
    assert _plain(masked, 1 << 62)
    assert _plain(outputs, 1 << 62) == all(out.reason is None for out in outputs)


def test_a_source_is_its_partition_and_offset_given_either_way():
    message = Message(topic="logins.raw", partition=3, offset=41, key=b"k", value=b"v")
    assert source_of(message) == (3, 41) == source_of((3, 41))


@given(st.lists(st.tuples(st.one_of(st.none(), st.binary(max_size=12)), st.integers(0, 5), st.integers(0, 1 << 40))))
def test_a_record_is_named_by_its_key_or_else_its_position_as_when_every_record_carried_both(records):
    """``stage_input`` makes ``where`` only for a key that may not serve as an id; the id a
    dead letter (mask) or a row (sink) gets is the one a ``where`` on every record gave."""
    messages = [Message(topic="t", partition=p, offset=o, key=k, value=b"v") for k, p, o in records]
    for (key, value, where_), m in zip(stage_input(messages), messages, strict=True):
        full = f"t/{m.partition()}/{m.offset()}"
        assert (key, value) == (m.key(), m.value())
        assert _fallback_id(key, where_) == _fallback_id(key, full)  # the mask's dead-letter id
        assert (key or where_.encode()).decode("utf-8", "replace") == (key or full.encode()).decode(
            "utf-8", "replace"
        )  # the sink's identity (SinkStage.plan)


_messages = st.lists(
    st.tuples(
        st.one_of(st.none(), st.binary(max_size=12), st.sampled_from([b"", b"id-1", b"\xffid", "text-id", "ü"])),
        st.one_of(st.none(), st.binary(max_size=12), st.sampled_from([b"", b"\x00\x00\x00\x00\x01abc"])),
        st.integers(0, 5),
        st.integers(0, 1 << 40),
    ),
    max_size=40,
)


@given(_messages)
def test_the_cores_reading_of_a_batch_is_the_references(records):
    """``streams_core.stage_input`` gives ``read_batch``'s inputs, partitions, offsets and
    schema headers for any keys and values (a ``where`` only for a key that is no id)."""
    core_module()
    reader = mask_core.load_batch_reader(read_batch, [], where, CONFLUENT_HEADER_LEN, require=True)
    assert reader is not read_batch
    messages = [Message(topic="t", partition=p, offset=o, key=k, value=v) for k, v, p, o in records]
    assert reader(messages) == read_batch(messages)


def test_a_reader_that_differs_is_not_used_or_is_an_error(monkeypatch):
    streams_core = core_module()

    def shifted(messages, place, head_len):  # the schema headers one byte short
        return streams_core.stage_input(messages, place=place, head_len=head_len - 1)

    wrong = type(sys)("streams_core")
    wrong.stage_input = shifted
    monkeypatch.setitem(sys.modules, "streams_core", wrong)
    assert (
        mask_core.load_batch_reader(read_batch, _READ_PROBES, where, CONFLUENT_HEADER_LEN, require=False) is read_batch
    )
    with pytest.raises(ConfigError, match="STREAMS_REQUIRE_CORE=1"):
        mask_core.load_batch_reader(read_batch, _READ_PROBES, where, CONFLUENT_HEADER_LEN, require=True)
    del wrong.stage_input  # a build without it: the same
    assert (
        mask_core.load_batch_reader(read_batch, _READ_PROBES, where, CONFLUENT_HEADER_LEN, require=False) is read_batch
    )

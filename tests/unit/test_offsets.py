"""Pure logic of `streams replay`: reading --to, and planning each partition's new offset."""

from __future__ import annotations

import pytest

from streams.errors import Refused
from streams.ops.replay import Target, parse_target, plan
from streams.ops.topology import stage_topic
from streams.settings import Settings

WATERMARKS = {0: (0, 10), 1: (5, 20), 2: (0, 0)}
COMMITTED = {0: 10, 1: 20, 2: None}


def test_parse_named_positions():
    assert parse_target("earliest") == Target("earliest")
    assert parse_target(" latest ") == Target("latest")


def test_parse_explicit_offsets():
    assert parse_target("0:10,3:0") == Target("offsets", offsets={0: 10, 3: 0})


def test_parse_times_are_utc_milliseconds():
    assert parse_target("2024-05-01T00:00:00Z").timestamp_ms == 1714521600000
    assert parse_target("2024-05-01T02:00:00+02:00").timestamp_ms == 1714521600000
    assert parse_target("2024-05-01 00:00").timestamp_ms == 1714521600000  # no zone: UTC
    assert parse_target("1714521600000") == Target("timestamp", timestamp_ms=1714521600000)


@pytest.mark.parametrize("text", ["soon", "0:1,0:2", "1:2:3", ""])
def test_parse_rejects_in_one_line(text):
    with pytest.raises(Refused) as err:
        parse_target(text)
    assert "\n" not in str(err.value)


def test_plan_earliest_and_latest_use_watermarks():
    assert plan(Target("earliest"), COMMITTED, WATERMARKS) == {0: 0, 1: 5, 2: 0}
    assert plan(Target("latest"), COMMITTED, WATERMARKS) == {0: 10, 1: 20, 2: 0}


def test_plan_timestamp_moves_partitions_without_later_records_to_their_end():
    assert plan(Target("timestamp", timestamp_ms=1), COMMITTED, WATERMARKS, {0: 4, 1: -1, 2: -1}) == {0: 4, 1: 20, 2: 0}


def test_plan_explicit_offsets_move_only_named_partitions():
    assert plan(Target("offsets", offsets={1: 7}), COMMITTED, WATERMARKS) == {1: 7}


@pytest.mark.parametrize("offsets, hint", [({1: 4}, "range 5-20"), ({1: 21}, "range 5-20"), ({9: 0}, "partitions 0-2")])
def test_plan_refuses_offsets_outside_the_log(offsets, hint):
    with pytest.raises(Refused, match=hint):
        plan(Target("offsets", offsets=offsets), COMMITTED, WATERMARKS)


def test_stage_topics():
    s = Settings(raw_topic="r", masked_topic="m")
    assert (stage_topic(s, "mask"), stage_topic(s, "sink")) == ("r", "m")
    with pytest.raises(Refused):
        stage_topic(s, "bridge")

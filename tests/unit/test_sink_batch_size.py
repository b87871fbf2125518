"""The sink may take bigger batches than the mask stage (issue 20: fewer commits per row)."""

from __future__ import annotations

import pytest

from streams.settings import Settings


def settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


def test_every_stage_takes_batch_size_records_by_default():
    s = settings(batch_size=300)
    assert s.stage_batch_size("mask") == 300
    assert s.stage_batch_size("sink") == 300


def test_sink_batch_size_sets_the_sink_batch_only():
    s = settings(batch_size=300, sink_batch_size=2000)
    assert s.stage_batch_size("sink") == 2000
    assert s.stage_batch_size("mask") == 300


def test_an_empty_sink_batch_size_means_the_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STREAMS_SINK_BATCH_SIZE", "")
    assert settings(batch_size=300).stage_batch_size("sink") == 300


def test_a_sink_batch_size_below_one_is_refused():
    with pytest.raises(ValueError):
        settings(sink_batch_size=0)

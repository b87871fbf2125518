"""When the sink COPYs a batch blind (``CopyMode``): after clean lookups, back to lookups after a miss."""

from __future__ import annotations

from streams.pipeline.sink import CopyMode


def test_the_first_batch_is_looked_up_and_a_clean_lookup_makes_the_next_blind():
    mode = CopyMode()
    assert not mode.blind  # a restart replays its last batch: look it up
    mode.looked_up(found=False)
    assert mode.blind
    mode.copied()
    assert mode.blind


def test_a_lookup_that_finds_keys_keeps_looking_up():
    mode = CopyMode()
    for _ in range(5):
        mode.looked_up(found=True)
        assert not mode.blind
    mode.looked_up(found=False)
    assert mode.blind


def test_each_miss_doubles_the_clean_lookups_needed_up_to_a_bound_and_a_blind_copy_resets_it():
    mode = CopyMode()
    mode.looked_up(found=False)
    for needed in (2, 4, 8, 16, 32, 64, 64):
        mode.missed()
        assert not mode.blind
        for _ in range(needed - 1):
            mode.looked_up(found=False)
            assert not mode.blind
        mode.looked_up(found=False)
        assert mode.blind
    mode.copied()
    mode.missed()
    mode.looked_up(found=False)
    assert not mode.blind  # needed 2 again, not 128
    mode.looked_up(found=False)
    assert mode.blind

"""Faust's delivery rules for both agents, in one place: take a batch, write it durably, then ack.

Faust has traps that lose or skip records (docs/delivery.md has each, with its test):

- an agent that raises has its in-flight events acked by Faust's supervisor restart,
  and its offsets committed: we exit the process instead (``exit_on_error``), so the
  batch is redelivered to whoever takes the partition next;
- ``stream.take()`` acks its batch in a ``finally``, even when the handler failed:
  we use ``noack_take`` and ack only after the handler returned, i.e. after the
  broker or the database has the batch;
- Faust's value decoding acks and drops undecodable records: the topics are ``raw``
  bytes and each stage decodes (and dead-letters) itself;
- with ``concurrency > 1`` Faust can commit past an unfinished batch: one actor per
  agent, which handles a whole batch at a time.

Acks use ``Event.ack()``, which is what ``Stream.ack`` does besides reporting to the
sensors (pinned in tests/unit/test_faust_pins.py).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from streams.metrics import BATCH_SECONDS, BATCH_SIZE, LIVENESS, RECORDS_IN

log = logging.getLogger("streams.worker")

Events = list[Any]  # faust.Event; Faust has no type information
# A handler returns once its outputs are durable (None), or returns an awaitable that
# completes once they are (a produce still waiting for the broker's acks).
BatchHandler = Callable[[Events], Awaitable[Awaitable[None] | None]]


def where(event: Any) -> str:
    """``topic/partition/offset`` of an event: an identity for records without a usable key."""
    message = event.message
    return f"{message.topic}/{message.partition}/{message.offset}"


def source_timestamp(event: Any) -> int:
    """The consumed record's Kafka timestamp in ms (0 if it has none): its dead letter keeps it."""
    timestamp = event.message.timestamp
    return int(timestamp * 1000) if timestamp and timestamp > 0 else 0


def _die(agent: str, exc: BaseException) -> None:
    """An agent raised: exit instead of letting Faust restart it with the batch unacked.

    Only the exception type is logged: messages may quote data.
    """
    log.critical("agent %s failed (%s); exiting so its unacked batch is redelivered", agent, type(exc).__name__)
    logging.shutdown()
    os._exit(70)


def batch_agent(
    name: str, batch_size: int, within: float, handle: BatchHandler, depth: int = 2
) -> Callable[[Any], Awaitable[None]]:
    """The body of a Faust agent: batches of events to ``handle``, acked once their outputs are durable.

    ``handle`` must not return before its outputs are durable, or must return an
    awaitable that completes only once they are; it must never raise for a bad record
    (that is a dead letter); whatever it (or its awaitable) raises ends the process.

    Pipelined, ``depth`` batches at most: while one batch's outputs wait for the broker,
    the next is taken and handled. Acks stay in batch order: a batch is acked only after
    every earlier batch was, and only once its own outputs are durable (the consumer's
    hole filling relies on offsets being acked in order, see consumer.py).
    """

    in_ = RECORDS_IN.labels(name)
    size, seconds = BATCH_SIZE.labels(name), BATCH_SECONDS.labels(name)

    async def agent(stream: Any) -> None:
        acking: collections.deque[asyncio.Task] = collections.deque()

        def died(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                _die(name, task.exception())  # type: ignore[arg-type]

        async def ack_when_durable(
            events: Events, durable: Awaitable[None] | None, before: asyncio.Task | None, began: float
        ) -> None:
            if before is not None:
                await before
            if durable is not None:
                await durable
            # Event.ack is the ack itself (the message's refcount; at zero its offset
            # may be committed); Stream.ack adds only two sensor calls per event.
            for event in events:
                event.ack()
            seconds.observe(time.monotonic() - began)
            size.observe(len(events))
            LIVENESS.finished()

        try:
            async for events in stream.noack_take(batch_size, within=within):
                LIVENESS.started()
                in_.inc(len(events))
                durable = await handle(events)
                before = acking[-1] if acking else None
                task = asyncio.ensure_future(ack_when_durable(events, durable, before, time.monotonic()))
                task.add_done_callback(died)
                acking.append(task)
                while acking and acking[0].done():
                    acking.popleft().result()
                while len(acking) >= depth:
                    await acking.popleft()
        except asyncio.CancelledError:
            for task in acking:  # unacked: redelivered to whoever takes the partitions
                task.cancel()
            raise
        except Exception as exc:
            _die(name, exc)

    functools.update_wrapper(agent, handle)
    agent.__name__ = name
    return agent

"""The mask agent's shape with the transform replaced by a byte copy: Faust's own cost.

Same app, agents, batching, producer and acks as ``streams worker`` (``STREAMS_STAGES=mask``);
each raw record goes to the masked topic unchanged. Run by ``benchmarks.run``:
``python -m benchmarks.copy_worker`` with the worker's ``STREAMS_*`` environment.
"""

from __future__ import annotations

from collections.abc import Sequence

from streams.pipeline import app
from streams.pipeline.mask import Output
from streams.settings import load_settings


class CopyTransform:
    def __init__(self, _masker: object, codecs: object, _erased: object = None) -> None:
        self.codecs = codecs  # the stage's writer builds dead letters with them

    def batch(self, messages: Sequence[tuple[bytes | None, bytes | None, str]]) -> list[Output]:
        return [Output(key or b"", value or b"") for key, value, _ in messages]


def main() -> None:
    app.MaskTransform = CopyTransform  # type: ignore[misc,assignment]
    app.run_worker(load_settings(stages="mask"))


if __name__ == "__main__":
    main()

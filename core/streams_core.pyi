# Types of the compiled mask core (src/lib.rs); composed by streams/privacy/core.py.
from collections.abc import Callable
from typing import Any, overload

class Mac:
    """HMAC-SHA256 under one key, every message starting with ``prefix``."""

    def __init__(self, key: bytes, prefix: bytes) -> None: ...
    def digests(self, values: list[str] | list[bytes]) -> list[bytes | None]: ...
    def tokens(self, head: str, values: list[str] | list[bytes]) -> list[str | None]: ...

class Siv:
    """AES-SIV keys by index (32 or 64 bytes)."""

    def __init__(self, keys: list[bytes]) -> None: ...
    @overload
    def seal(
        self,
        key_index: int | list[int],
        plaintexts: list[str] | list[bytes],
        pad_block: int | list[int],
        ad_shared: list[bytes],
        ad_each: list[str | None] | list[bytes | None] | None = None,
        head: None = None,
        prefix_each: list[bytes] | None = None,
        ad_parts: list[bytes | list[str | None] | list[bytes | None]] | None = None,
    ) -> list[bytes | None]: ...
    @overload
    def seal(
        self,
        key_index: int | list[int],
        plaintexts: list[str] | list[bytes],
        pad_block: int | list[int],
        ad_shared: list[bytes],
        ad_each: list[str | None] | list[bytes | None] | None,
        head: str,
        prefix_each: None = None,
        ad_parts: list[bytes | list[str | None] | list[bytes | None]] | None = None,
    ) -> list[str | None]: ...

def parse_logins(
    values: list[bytes | None], headers: list[bytes]
) -> list[tuple[str, int, str, str, str, bool, str, str, int | None, str | None] | None]: ...

def copy_binary(columns: list[list[str]] | list[list[bytes]] | list[list[str] | list[bytes]]) -> bytes | None: ...

class DedupWindow:
    """The mask stage's window of message ids written (core/src/dedup.rs), as
    ``streams.pipeline.dedup.DedupWindow``: verdicts ``None`` (every record written) or a
    list of bools, with the ids evicted inside the window."""

    def __init__(self, window_ms: int, limit: int) -> None: ...
    @property
    def size(self) -> int: ...
    @property
    def newest(self) -> dict[int, int]: ...
    def partitions(self) -> list[int]: ...
    def admit_batch(
        self,
        partitions: list[int],
        offsets: list[int],
        keys: list[bytes | None],
        timestamps: list[int],
        redrive: Callable[[int], object] | None = None,
    ) -> tuple[list[bool] | None, int]: ...
    def admit_records(
        self,
        partitions: list[int],
        offsets: list[int],
        outputs: list[Any],
        messages: list[Any],
        redrive: Callable[[int], object] | None = None,
    ) -> tuple[list[bool] | None, int]: ...
    def flush(self) -> list[tuple[int, int, bytes]]: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def forget(self, partitions: list[int]) -> None: ...
    def install(self, partition: int, entries: list[tuple[bytes, tuple[int, int]]]) -> tuple[int, int]: ...
    def entries(self, partition: int) -> list[tuple[int, int, int]]: ...
    def heap_bytes(self) -> int: ...

class RecordEncoder:
    """A flat Avro record's binary encoding for a batch (src/avro.rs): per field in schema
    order ``(kind, nullable, column, item)`` (kind ``string``, ``bytes``, ``int``, ``long``,
    ``boolean``; column -1: null; item -1: the column's element itself), the key's
    ``(column, item)``."""

    def __init__(self, header: bytes, fields: list[tuple[str, bool, int, int]], key: tuple[int, int]) -> None: ...
    def encode(self, columns: list[list[Any]], n: int, make: Callable[[tuple[bytes, bytes, None]], Any]) -> tuple[list[Any], int]: ...

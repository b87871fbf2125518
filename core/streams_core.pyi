# Types of the compiled mask core (src/lib.rs); composed by streams/privacy/core.py.
from typing import overload

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

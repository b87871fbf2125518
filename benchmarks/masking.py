"""Masking cost per record: canonicalise + HMAC token + AES-SIV ciphertext for ip and device_id.

Pure CPU, no services: `python -m benchmarks.masking [N]`. Reports the cost with every
value distinct (cache misses, the worst case) and with a realistic duplicate rate
(the worker's LRU cache answers repeats).
"""

from __future__ import annotations

import json
import sys
import time

from streams.privacy.keys import generate_document, parse_keyring
from streams.privacy.masking import Masker, canonical_device_id, canonical_ip


def _mask_record(masker: Masker, ip: str, device_id: str) -> None:
    masker.mask("ip", canonical_ip(ip)[0])
    masker.mask("device_id", canonical_device_id(device_id))


def _per_record_us(records: list[tuple[str, str]], cache_size: int, repeat: int = 5) -> float:
    keyring = parse_keyring(json.dumps(generate_document()), "bench")
    best = float("inf")
    for _ in range(repeat):
        masker = Masker(keyring, cache_size=cache_size)  # fresh cache each round
        start = time.perf_counter()
        for ip, device_id in records:
            _mask_record(masker, ip, device_id)
        best = min(best, time.perf_counter() - start)
    return best / len(records) * 1e6


def main(n: int = 20_000) -> dict[str, float]:
    distinct = [(f"10.{i % 256}.{i // 256 % 256}.{i % 7}", f"{i:03}-00-{i:06}") for i in range(n)]
    repeated = [(f"10.0.{i % 97}.1", f"dev-{i % 131}") for i in range(n)]
    v6 = [(f"2001:DB8::{i:x}", f"{i:03}-00-{i:06}") for i in range(n)]
    results = {
        "mask ip+device_id, IPv4, all values distinct (no cache)": _per_record_us(distinct, cache_size=0),
        "mask ip+device_id, IPv6, all values distinct (no cache)": _per_record_us(v6, cache_size=0),
        "mask ip+device_id, ~100 distinct values (LRU cache)": _per_record_us(repeated, cache_size=65536),
    }
    for name, us in results.items():
        print(f"{name:58} {us:6.1f} µs/record")
    return results


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)

"""Per-record cost of the mask stage's hot path: Avro decode, parse, mask, Avro encode.

Pure CPU, no services: `python -m benchmarks.hot_path [N]`.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time

from streams.io.codec import Codecs
from streams.pipeline.mask import MaskTransform
from streams.privacy.keys import generate_document, parse_keyring
from streams.privacy.masking import Masker

SENT = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)


def _per_record_us(fn, items: list, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best / len(items) * 1e6


def main(n: int = 20_000) -> dict[str, float]:
    codecs = Codecs()
    bodies = [
        json.dumps(
            {
                "user_id": f"u{i}",
                "app_version": "2.3.0",
                "device_type": "ios",
                "ip": f"10.{i % 256}.{i // 256 % 256}.{i % 7}",
                "locale": "RU",
                "device_id": f"{i % 999:03}-00-{i:04}",
            }
        )
        for i in range(n)
    ]
    envelopes = [
        codecs.raw.encode({"message_id": f"m-{i}", "sent_at": SENT, "body": b, "attributes": {}})
        for i, b in enumerate(bodies)
    ]
    decoded = [codecs.raw.decode(e) for e in envelopes]
    results = {
        "raw envelope decode": _per_record_us(codecs.raw.decode, envelopes),
        "raw envelope encode": _per_record_us(codecs.raw.encode, decoded),
    }
    keyring = parse_keyring(json.dumps(generate_document()), "bench")
    # A fresh masker per round measures the uncached cost; values are distinct anyway.
    transform = MaskTransform(Masker(keyring, cache_size=0), codecs)
    results["mask transform (decode+parse+mask+encode), distinct values"] = _per_record_us(
        lambda e: transform(None, e, "bench"), envelopes
    )
    for name, us in results.items():
        print(f"{name:62} {us:7.1f} µs/record")
    return results


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)

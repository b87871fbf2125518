"""Per-user key mode's mask transform on the compiled core, CPU per record (issue 19 item 7).

    python -m benchmarks.user_keys [--messages 20000] [--batch 500] [--rounds 5]

What the mask stage runs per batch in per-user key mode, without Kafka or PostgreSQL:
``SealingMaskTransform.batch`` (parse, tokens, seal, per-user key lookup or creation) and
``Lifetime.take`` (the new keys' wrapping under the lifetime key, handed to the key store).
Two inputs: every record a new user (the worst case) and users that recur (one per 20
records); two ways of wrapping new keys: the compiled core (one call per batch) and the
Python reference (one AES-SIV call per key). The lifetime key comes from a stand-in for
the KMS (one call per lifetime, outside the hot path). CPU time, best of ``--rounds``,
a fresh transform each round (no key or token cached before).
"""

from __future__ import annotations

import argparse
import os
import random
import time

from benchmarks.harness import logins, raw_records
from streams.io.codec import Codecs
from streams.pipeline.mask import SealingMaskTransform
from streams.privacy import core as mask_core
from streams.privacy.masking import UserMasker
from streams.privacy.user_keys import Lifetime

JOIN = {"ip": bytes(range(32)), "device_id": bytes(range(100, 132))}


class _LocalKms:
    """Stands in for GenerateDataKey: a random lifetime key, a dummy wrapped form."""

    def arn(self) -> str:
        return "arn:aws:kms:us-east-1:123456789012:key/bench"

    def _call(self, operation: str, **kwargs):
        return {"Plaintext": os.urandom(kwargs["NumberOfBytes"]), "CiphertextBlob": os.urandom(24)}


def per_record_us(raw: list[bytes], batch: int, rounds: int, wrapping) -> float:
    messages = [(None, v, "bench") for v in raw]
    best = float("inf")
    for _ in range(rounds):
        lifetime = Lifetime(_LocalKms(), "bench", wrapping=wrapping)
        transform = SealingMaskTransform(UserMasker(JOIN, "g1", lifetime), Codecs())
        assert transform.core is not None, "streams_core is not built: make install"
        start = time.process_time()
        for i in range(0, len(messages), batch):
            transform.batch(messages[i : i + batch])
            lifetime.take()
        best = min(best, time.process_time() - start)
    return best / len(messages) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500, help="records per batch (STREAMS_BATCH_SIZE)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    n = args.messages
    core_wrapping = mask_core.load_key_wrapping(require=True)
    inputs = {
        "every record a new user": logins(n),
        f"{n // 20:,} users, recurring": logins(n, users=n // 20),
    }
    print(f"| input | wrapping | µs CPU per record (best of {args.rounds}, {n:,} records, batches of {args.batch}) |")
    print("|---|---|---:|")
    order = [("core, one call per batch", core_wrapping), ("reference, one AES-SIV call per key", None)]
    for name, bodies in inputs.items():
        raw = [v for _, _, v in raw_records("t", bodies)]
        results = {label: [] for label, _ in order}
        for _ in range(2):  # alternate, so drift on a shared machine hits both alike
            for label, wrapping in random.sample(order, len(order)):
                results[label].append(per_record_us(raw, args.batch, args.rounds, wrapping))
        for label, _ in order:
            print(f"| {name} | {label} | {min(results[label]):.2f} |")


if __name__ == "__main__":
    main()

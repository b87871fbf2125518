"""Regenerate the golden corpus of the mask transform (run once, before optimising it).

Inputs: the sample data, the hostile-input catalogue and 500 distinct generated logins,
wrapped as raw envelopes (fixed message ids and timestamps), plus a few records that are
not envelopes at all. Outputs: what the transform made of each with the fixed keys in
``keys.json`` beside this file. Dead letters are stored without ``failed_at`` (a clock).

    python -m tests.golden.make_corpus   # rewrites tests/golden/corpus.jsonl
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def fixed_keys() -> str:
    rng = random.Random(20261201)

    def key(n: int) -> str:
        return base64.b64encode(bytes(rng.randrange(256) for _ in range(n))).decode()

    return json.dumps(
        {
            # Domain-separated tokens (field and version in the MAC input), as `keys init` makes them.
            "join": {
                "active": "h1",
                "domain_separated": ["h1"],
                "versions": {"h1": {"ip": key(32), "device_id": key(32)}},
            },
            "encryption": {"active": "k1", "keys": {"k1": key(64)}},
        },
        indent=2,
    )


def bodies() -> list[str]:
    from tests.integration.test_hostile import CATALOGUE

    sample = json.loads((REPO / "data" / "sample_data.json").read_text())
    out = [s if isinstance(s, str) else json.dumps(s) for s in sample]
    out += [body for _, body, _ in CATALOGUE if len(body) < 20_000]
    rng = random.Random(7)
    for i in range(500):
        out.append(
            json.dumps(
                {
                    "user_id": f"u-{i}-{rng.getrandbits(32):08x}",
                    "app_version": rng.choice(["2.3.0", "0.96", "5.0.1", "10.2", "1.2.3.4", "beta"]),
                    "device_type": rng.choice(["ios", "android"]),
                    "ip": rng.choice(
                        [
                            f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
                            f"2001:db8::{rng.getrandbits(16):x}",
                            f"::ffff:192.0.2.{rng.randrange(256)}",
                        ]
                    ),
                    "locale": rng.choice(["EN", "RU", None]),
                    "device_id": f"{rng.getrandbits(48):012x}-{i}",
                }
            )
        )
    return out


def main() -> None:
    from streams.io.codec import Codecs
    from streams.pipeline.mask import MaskTransform
    from streams.privacy.keys import parse_keyring
    from streams.privacy.masking import Masker

    keys = fixed_keys()
    (HERE / "keys.json").write_text(keys)
    codecs = Codecs()
    transform = MaskTransform(Masker(parse_keyring(keys, "golden")), codecs)
    inputs: list[tuple[bytes | None, bytes]] = []
    for i, body in enumerate(bodies()):
        mid = f"golden-{i:04d}"
        env = {"message_id": mid, "sent_at": 1_764_000_000_000 + i, "body": body, "attributes": {"SentTimestamp": "1"}}
        inputs.append((mid.encode(), codecs.raw.encode(env)))
    inputs += [(b"not-avro", b"hello"), (None, b"\xc3\x01" + b"\0" * 12), (b"\xff\xfe", b"")]
    with open(HERE / "corpus.jsonl", "w") as fh:
        for i, (key, value) in enumerate(inputs):
            out = transform(key, value, f"golden/0/{i}")
            if out.reason:
                dead = codecs.dead_letter.decode(out.value)
                dead.pop("failed_at")
                dead["payload"] = dead["payload"].hex()
                result = {"dead_letter": dead}
            else:
                result = {"out_value": out.value.hex()}
            fh.write(
                json.dumps(
                    {
                        "key": key.hex() if key is not None else None,
                        "value": value.hex(),
                        "out_key": out.key.hex(),
                        "reason": out.reason,
                        **result,
                    }
                )
                + "\n"
            )
    print(f"wrote {len(inputs)} cases")


if __name__ == "__main__":
    main()

"""The mask transform against the golden corpus made by the transform before any optimisation."""

from __future__ import annotations

import json
from pathlib import Path

from streams.io.codec import Codecs
from streams.pipeline.mask import MaskTransform
from streams.privacy.keys import parse_keyring
from streams.privacy.masking import Masker

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def test_transform_matches_golden_corpus_byte_for_byte():
    codecs = Codecs()
    transform = MaskTransform(Masker(parse_keyring((GOLDEN / "keys.json").read_text(), "golden")), codecs)
    cases = [json.loads(line) for line in (GOLDEN / "corpus.jsonl").read_text().splitlines()]
    assert len(cases) > 600 and sum(1 for c in cases if c["reason"]) > 20
    for i, case in enumerate(cases):
        key = bytes.fromhex(case["key"]) if case["key"] is not None else None
        out = transform(key, bytes.fromhex(case["value"]), f"golden/0/{i}")
        assert out.key.hex() == case["out_key"], i
        assert out.reason == case["reason"], i
        if out.reason:
            dead = codecs.dead_letter.decode(out.value)
            dead.pop("failed_at")
            dead["payload"] = dead["payload"].hex()
            assert dead == case["dead_letter"], i
        else:
            assert out.value.hex() == case["out_value"], i

"""Issue 19 item 6: field and version inside the MAC input, under a new token version; older tokens still join."""

from __future__ import annotations

import base64
import hmac
import json

import pytest

from streams.privacy import keys
from streams.privacy.keys import KeyMaterialError, parse_keyring
from streams.privacy.masking import Masker


def b64url(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def legacy_document() -> dict:
    """A key file as written before issue 19: no ``domain_separated`` list."""
    doc = keys.generate_document()
    del doc["join"]["domain_separated"]
    return doc


def test_new_tokens_have_the_field_and_version_in_the_mac_input():
    doc = keys.generate_document()
    masker = Masker(parse_keyring(json.dumps(doc), "t"))
    key = base64.b64decode(doc["join"]["versions"]["h1"]["ip"])
    token = masker.mask("ip", "192.0.2.1").token
    assert token == "h1." + b64url(hmac.digest(key, b"ip\x00h1\x00192.0.2.1", "sha256"))
    assert token != "h1." + b64url(hmac.digest(key, b"192.0.2.1", "sha256"))
    assert masker.token("ip", "192.0.2.1", "h1") == token  # the slow path (rotation) agrees


def test_older_versions_keep_their_tokens_and_rejoin_moves_them_to_a_separated_version():
    doc = legacy_document()
    old = Masker(parse_keyring(json.dumps(doc), "t"))
    key = base64.b64decode(doc["join"]["versions"]["h1"]["device_id"])
    old_token = old.mask("device_id", "d-1").token
    assert old_token == "h1." + b64url(hmac.digest(key, b"d-1", "sha256"))  # unchanged bytes

    assert keys.add_join_version(doc) == "h2"  # `streams keys rotate join`
    assert doc["join"]["domain_separated"] == ["h2"]
    both = Masker(parse_keyring(json.dumps(doc), "t"))
    assert both.belongs("device_id", old_token, "d-1")  # the old token still checks (rejoin opens it)
    new_key = base64.b64decode(doc["join"]["versions"]["h2"]["device_id"])
    new_token = both.token("device_id", "d-1", "h2")
    assert new_token == "h2." + b64url(hmac.digest(new_key, b"device_id\x00h2\x00d-1", "sha256"))
    assert both.belongs("device_id", new_token, "d-1")


def test_identical_keys_for_the_two_fields_are_refused_at_load():
    doc = keys.generate_document()
    version = doc["join"]["versions"]["h1"]
    version["device_id"] = version["ip"]
    with pytest.raises(KeyMaterialError, match="one key for two fields") as refused:
        parse_keyring(json.dumps(doc), "keys.json")
    assert version["ip"] not in str(refused.value)

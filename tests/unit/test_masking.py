"""Masking: canonical values, tokens, recovery ciphertexts."""

import json

import pytest

from streams.keys import KeyMaterialError, generate_document, parse_keyring
from streams.masking import Masker, RevealError, canonical_device_id, canonical_ip


def masker(doc=None):
    return Masker(parse_keyring(json.dumps(doc or generate_document()), "test"))


@pytest.mark.parametrize(
    "value, canonical, valid",
    [
        ("199.172.111.135", "199.172.111.135", True),
        (" 1.2.3.4\n", "1.2.3.4", True),
        ("::1", "::1", True),
        ("2001:DB8:0:0::1", "2001:db8::1", True),
        ("::ffff:192.0.2.1", "192.0.2.1", True),
        ("fe80::1%eth0", "fe80::1%eth0", True),
        ("not an ip", "not an ip", False),
    ],
)
def test_canonical_ip(value, canonical, valid):
    assert canonical_ip(value) == (canonical, valid)


def test_canonical_device_id_trims():
    assert canonical_device_id(" 593-47-5928 ") == "593-47-5928"


def test_equal_values_share_a_token_and_different_ones_do_not():
    m = masker()
    assert m.mask("ip", "1.2.3.4").token == m.mask("ip", canonical_ip("::ffff:1.2.3.4")[0]).token
    assert m.mask("ip", "1.2.3.4").token != m.mask("ip", "1.2.3.5").token


def test_token_depends_on_key_and_field():
    a, b = masker(), masker()
    assert a.mask("ip", "1.2.3.4").token != b.mask("ip", "1.2.3.4").token
    assert a.mask("ip", "x").token != a.mask("device_id", "x").token


def test_token_shape_and_no_plaintext():
    token = masker().mask("ip", "1.2.3.4").token
    assert token.startswith("h1.") and len(token) == 46 and "1.2.3.4" not in token


def test_ciphertext_reveals_only_with_the_right_key_and_field():
    m = masker()
    ciphertext = m.mask("device_id", "593-47-5928").ciphertext
    assert ciphertext.startswith("k1.")
    assert m.decrypt("device_id", ciphertext) == "593-47-5928"
    with pytest.raises(RevealError):
        m.decrypt("ip", ciphertext)
    with pytest.raises(RevealError):
        masker().decrypt("device_id", ciphertext)


def test_ciphertext_length_does_not_depend_on_value_length():
    m = masker()
    assert len({len(m.mask("ip", v).ciphertext) for v in ("1.1.1.1", "255.255.255.255", "fe80::1:2:3:4%eth0")}) == 1


@pytest.mark.parametrize(
    "text",
    ["", "{}", '{"join": {}, "encryption": {}}', json.dumps({**generate_document(), "join": {"active": "h9", "versions": {}}})],
)
def test_malformed_key_material_is_one_clear_error(text):
    with pytest.raises(KeyMaterialError) as info:
        parse_keyring(text, "keys.json")
    assert "keys.json" in str(info.value) and "\n" not in str(info.value)


def test_short_key_is_refused_without_printing_it():
    doc = generate_document()
    doc["encryption"]["keys"]["k1"] = "c2hvcnQ="
    with pytest.raises(KeyMaterialError) as info:
        parse_keyring(json.dumps(doc), "keys.json")
    assert "c2hvcnQ" not in str(info.value)

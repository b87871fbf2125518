"""Masking: canonical values, tokens, recovery ciphertexts."""

import base64
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.privacy.keys import KeyMaterialError, generate_document, parse_keyring
from streams.privacy.masking import PAD_BLOCK, Masker, RevealError, canonical_device_id, canonical_ip, token_version


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
        ("010.1.1.1", "010.1.1.1", False),
        ("::ffff:1.2.3.4%eth0", "::ffff:102:304%eth0", True),
        ("FE80::1%Eth0", "fe80::1%Eth0", True),
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
    masked = m.mask("device_id", "593-47-5928")
    ciphertext, token = masked.ciphertext, masked.token
    assert ciphertext.startswith("k1.v2.")
    assert m.decrypt("device_id", ciphertext, token) == "593-47-5928"
    with pytest.raises(RevealError):
        m.decrypt("ip", ciphertext, token)
    with pytest.raises(RevealError):
        masker().decrypt("device_id", ciphertext, token)


def legacy_ciphertext(m: Masker, field: str, value: str) -> str:
    """A ciphertext in the format written before token binding: AD = field, key id."""
    from cryptography.hazmat.primitives.ciphers.aead import AESSIV

    from streams.privacy.masking import pad

    sealed = AESSIV(m.keyring.encryption_keys["k1"]).encrypt(pad(value.encode()), [field.encode(), b"k1"])
    return "k1." + base64.urlsafe_b64encode(sealed).rstrip(b"=").decode()


def test_new_ciphertexts_are_bound_to_their_token():
    m = masker()
    a, b = m.mask("ip", "192.0.2.1"), m.mask("ip", "192.0.2.2")
    assert m.decrypt("ip", a.ciphertext, a.token) == "192.0.2.1"
    with pytest.raises(RevealError) as info:  # copied under another token: does not open
        m.decrypt("ip", a.ciphertext, b.token)
    assert "192.0.2" not in str(info.value)
    with pytest.raises(RevealError):  # stripped of its format marker: does not open either
        m.decrypt("ip", a.ciphertext.replace(".v2.", "."), a.token)


def test_older_unbound_ciphertexts_still_open_and_belongs_catches_a_copy():
    m = masker()
    old = legacy_ciphertext(m, "ip", "192.0.2.1")
    own, other = m.token("ip", "192.0.2.1"), m.token("ip", "192.0.2.2")
    assert m.decrypt("ip", old) == m.decrypt("ip", old, other) == "192.0.2.1"  # opens under any token...
    assert m.belongs("ip", own, "192.0.2.1")
    assert not m.belongs("ip", other, "192.0.2.1")  # ...so the token is recomputed from the value
    assert not m.belongs("ip", "not a token", "192.0.2.1")


def test_belongs_needs_the_tokens_join_version_and_decrypt_names_a_missing_key():
    from streams.privacy.masking import MissingKeyError

    m = masker()
    with pytest.raises(MissingKeyError):
        m.belongs("ip", "h7." + "A" * 43, "192.0.2.1")
    with pytest.raises(MissingKeyError) as info:
        m.decrypt("ip", "k9.v2." + "A" * 40, "h1." + "A" * 43)
    assert "k9" in str(info.value)


def test_ciphertext_length_does_not_depend_on_value_length():
    m = masker()
    assert len({len(m.mask("ip", v).ciphertext) for v in ("1.1.1.1", "255.255.255.255", "fe80::1:2:3:4%eth0")}) == 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{}",
        '{"join": {}, "encryption": {}}',
        json.dumps({**generate_document(), "join": {"active": "h9", "versions": {}}}),
    ],
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


# --- properties (hypothesis) ---------------------------------------------------------


M1, M2 = masker(), masker()
values = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60)
ips = st.ip_addresses().map(str)
fields = st.sampled_from(["ip", "device_id"])


@given(fields, values, values)
def test_property_tokens_equal_exactly_when_canonical_values_are(field, a, b):
    assert (M1.token(field, a) == M1.token(field, b)) == (a == b)


@given(ips)
def test_property_ip_spellings_share_a_token(ip):
    canonical, valid = canonical_ip(ip)
    spellings = [ip, f" {ip.upper()} ", canonical]
    if ":" not in ip:
        spellings.append(f"::ffff:{ip}")
    assert valid
    assert {M1.token("ip", canonical_ip(s)[0]) for s in spellings} == {M1.token("ip", canonical)}


@given(fields, values)
def test_property_token_changes_with_the_key(field, value):
    assert M1.token(field, value) != M2.token(field, value)


@given(fields, st.one_of(ips, values))
def test_property_reveal_of_mask_is_the_canonical_value(field, raw):
    canonical = canonical_ip(raw)[0] if field == "ip" else canonical_device_id(raw)
    masked = M1.mask(field, canonical)
    assert M1.decrypt(field, masked.ciphertext, masked.token) == canonical
    assert M1.belongs(field, masked.token, canonical)


@given(
    fields,
    st.text(st.characters(max_codepoint=127), max_size=200),
    st.text(st.characters(max_codepoint=127), max_size=200),
)
def test_property_ciphertext_length_does_not_depend_on_value_length(field, a, b):
    assert len(M1.encrypt(field, a, M1.token(field, a))) == len(M1.encrypt(field, b, M1.token(field, b)))


@settings(max_examples=200)
@given(fields, st.one_of(ips, values))
def test_property_token_is_not_the_value_nor_an_unkeyed_hash(field, value):
    token = M1.token(field, value)
    body = token.partition(".")[2]
    data = value.encode()
    forbidden = {value, base64.b64encode(data).decode(), base64.urlsafe_b64encode(data).decode().rstrip("=")}
    for name in ("sha256", "sha1", "md5"):
        digest = hashlib.new(name, data).digest()
        forbidden |= {
            digest.hex(),
            base64.b64encode(digest).decode(),
            base64.b64encode(digest).decode().rstrip("="),
            base64.urlsafe_b64encode(digest).decode().rstrip("="),
        }
    assert token not in forbidden and body not in forbidden
    assert not any(f and f in token for f in forbidden if len(f) >= 8)


def test_pad_block_holds_the_longest_ascii_value():
    assert PAD_BLOCK >= 200 + 2


@pytest.mark.parametrize(
    "text", ["", "h1.", "h1.short", "1.2.3.4", "h1." + "a" * 42 + "!", "toolongversion123." + "a" * 43]
)
def test_malformed_tokens_are_refused_without_echoing_them(text):
    with pytest.raises(ValueError) as info:
        token_version(text)
    assert text not in str(info.value) or not text


def test_token_for_another_loaded_version():
    doc = generate_document()
    from streams.privacy.keys import add_join_version

    version = add_join_version(doc)
    m = masker(doc)
    assert m.token("ip", "1.2.3.4").startswith("h1.")
    assert m.token("ip", "1.2.3.4", version).startswith(version + ".")
    assert m.token("ip", "1.2.3.4", version).partition(".")[2] != m.token("ip", "1.2.3.4").partition(".")[2]

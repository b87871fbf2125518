"""Parsing, validation and flattening of login bodies, and the app_version encoding."""

import json

import pytest

from streams.pipeline.dead_letters import Reason, Rejected
from streams.pipeline.mask import encode_app_version, parse_login

VALID = {
    "user_id": "424cdd21-063a-43a7-b91b-7ca1a833afae",
    "app_version": "2.3.0",
    "device_type": "android",
    "ip": "199.172.111.135",
    "locale": "RU",
    "device_id": "593-47-5928",
}


def body(**changes):
    record = {**VALID, **changes}
    return json.dumps({k: v for k, v in record.items() if v is not ...})


def reason_of(text: str) -> Reason:
    with pytest.raises(Rejected) as info:
        parse_login(text)
    return info.value.reason


def test_valid_login_is_flattened():
    login = parse_login(body())
    assert (login.user_id, login.device_type, login.locale) == (VALID["user_id"], "android", "RU")
    assert (login.app_version_raw, login.app_version) == ("2.3.0", 2003000)
    assert (login.ip, login.device_id) == (VALID["ip"], VALID["device_id"])


def test_null_locale_is_kept_as_none():
    assert parse_login(body(locale=None)).locale is None


@pytest.mark.parametrize("field", ["user_id", "device_type", "ip", "device_id", "app_version", "locale"])
def test_missing_field_is_rejected_and_named(field):
    with pytest.raises(Rejected) as info:
        parse_login(body(**{field: ...}))
    assert info.value.reason is Reason.MISSING_FIELD
    assert field in info.value.detail


def test_sample_wrong_message_type_is_missing_fields():
    assert reason_of('{"foo": "oops_wrong_msg_type", "bar": "123"}') is Reason.MISSING_FIELD


@pytest.mark.parametrize("value", [1, 2.5, True, [], {}])
def test_wrong_type_is_rejected(value):
    assert reason_of(body(user_id=value)) is Reason.WRONG_TYPE


def test_null_required_field_is_rejected():
    assert reason_of(body(ip=None)) is Reason.NULL_FIELD


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", Reason.EMPTY_BODY),
        ("  \n\t", Reason.EMPTY_BODY),
        ("null", Reason.NOT_AN_OBJECT),
        ("[]", Reason.NOT_AN_OBJECT),
        ('"a string"', Reason.NOT_AN_OBJECT),
        ('{"user_id": "a"', Reason.INVALID_JSON),
        ('{"user_id": "a",}', Reason.INVALID_JSON),
        ("{'user_id': 'a'}", Reason.INVALID_JSON),
        ('{"user_id": NaN}', Reason.INVALID_JSON),
        ('{"a": 1, "a": 2}', Reason.DUPLICATE_KEY),
        ("[" * 100_000 + "]" * 100_000, Reason.TOO_DEEP),
        ('{"a":' * 100 + "1" + "}" * 100, Reason.TOO_DEEP),
    ],
)
def test_malformed_bodies_have_specific_reasons(text, reason):
    assert reason_of(text) is reason


def test_huge_number_in_a_field_is_a_wrong_type():
    assert reason_of(body().replace('"2.3.0"', "1e400")) is Reason.WRONG_TYPE


def test_text_limits():
    assert reason_of(body(device_type="x" * 33)) is Reason.FIELD_TOO_LONG
    assert reason_of(body(user_id="a\x00b")) is Reason.NUL_CHARACTER
    assert reason_of(body(user_id="\ud800")) is Reason.INVALID_UNICODE
    assert reason_of(body(user_id="  ")) is Reason.EMPTY_FIELD


def test_rejection_detail_never_quotes_the_value():
    secret_ip = "10.11.12.13"
    for text in (body(ip=[secret_ip]), body(ip=secret_ip + "\x00"), body(ip=secret_ip * 50)):
        with pytest.raises(Rejected) as info:
            parse_login(text)
        assert secret_ip not in str(info.value)


def test_extra_fields_are_ignored_and_text_is_kept_exactly():
    odd = "Robert'); DROP TABLE user_logins;-- %s $$ \\ 🙂 \u202e\u200b"
    login = parse_login(body(user_id=odd, extra={"x": 1}))
    assert login.user_id == odd


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2.3.0", 2_003_000),
        ("0.96", 96_000),
        ("2.00", 2_000_000),
        ("0.60", 60_000),
        ("3.7", 3_007_000),
        ("1", 1_000_000),
        ("2147.483.647", 2_147_483_647),
    ],
)
def test_app_version_encoding(text, expected):
    assert encode_app_version(text) == expected


@pytest.mark.parametrize("text", ["", "beta", "1.2.3.4", "1..2", "1.1000", "2148.0.0", "v1.2", "1.2-rc1", "١.٢"])
def test_unencodable_app_version_is_none(text):
    assert encode_app_version(text) is None


def test_unencodable_app_version_keeps_text():
    login = parse_login(body(app_version="beta-7"))
    assert (login.app_version_raw, login.app_version) == ("beta-7", None)


def test_app_version_encoding_preserves_order():
    versions = ["0.2.6", "0.4.6", "0.60", "0.96", "1", "2.00", "2.2.1", "2.2.8", "2.3.0", "3.7", "10.0"]
    assert [encode_app_version(v) for v in versions] == sorted(encode_app_version(v) for v in versions)


def _nested(levels: int) -> str:
    """A valid login whose extra field nests ``levels`` levels in total (the object is level 1)."""
    return body()[:-1] + ', "x": ' + "[" * (levels - 1) + "]" * (levels - 1) + "}"


def test_depth_limit_is_exact():
    assert parse_login(_nested(64)).user_id == VALID["user_id"]
    assert reason_of(_nested(65)) is Reason.TOO_DEEP


@pytest.mark.parametrize(
    "text, reason",
    [
        ("\ufeff" + body(), Reason.INVALID_JSON),  # a byte-order mark is not JSON
        (body()[:-1] + ', "x": {"a": 1, "a": 2}}', Reason.DUPLICATE_KEY),  # nested duplicates too
        (body()[:-1] + ', "x": Infinity}', Reason.INVALID_JSON),
        (body()[:-1] + ', "x": -Infinity}', Reason.INVALID_JSON),
        (body(locale=7), Reason.WRONG_TYPE),
        (body(ip=True), Reason.WRONG_TYPE),
        (body(device_id={"id": "x"}), Reason.WRONG_TYPE),
        (body(locale="x" * 33), Reason.FIELD_TOO_LONG),
    ],
)
def test_more_hostile_bodies(text, reason):
    assert reason_of(text) is reason


def test_out_of_range_number_in_an_unknown_field_is_ignored():
    """1e400 parses to inf; unknown fields are ignored, so the login still makes a row."""
    assert parse_login(body()[:-1] + ', "score": 1e400}').user_id == VALID["user_id"]


def test_escaped_and_literal_unicode_are_the_same_text():
    literal = json.dumps({**VALID, "user_id": "\u05e9\u05dc\u05d5\u05dd\u200f😀"}, ensure_ascii=False)
    escaped = json.dumps({**VALID, "user_id": "\u05e9\u05dc\u05d5\u05dd\u200f😀"})
    assert parse_login(literal) == parse_login(escaped)

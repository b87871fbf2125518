"""The documented KMS key policies (deploy/kms/*.json) and the evaluator that checks calls against them.

docs/privacy.md shows each policy; the files are the source, and the doc must show them
unchanged. The evaluator (tests/key_policy.py) is checked here on the semantics it claims,
and on refusing what it does not implement. tests/integration/test_key_policy_calls.py
checks the calls real processes make against these policies.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import REPO
from tests.key_policy import Call, Unsupported, allowed, decide

POLICIES = ("key-policy.json", "mac-key-policy.json", "keyring-key-policy.json")
ROLE = "arn:aws:iam::ACCOUNT:role/"
WORKER, CUSTODIAN, REVEAL, ADMIN = (
    ROLE + r for r in ("streams-worker", "streams-key-custodian", "streams-reveal", "streams-key-admin")
)
KEK = {"deployment": "prod", "purpose": "user-kek", "key_id": "00ff"}
USER = {"deployment": "prod", "purpose": "user-key", "user_id": "u-1", "key_id": "00ff"}


def policy(name: str) -> dict:
    return json.loads((REPO / "deploy" / "kms" / name).read_text())


def documented() -> dict[str, dict]:
    """Each JSON block of docs/privacy.md that follows a ``<!-- deploy/kms/<file> -->`` marker."""
    text = (REPO / "docs" / "privacy.md").read_text()
    blocks = re.findall(r"<!-- deploy/kms/([\w.-]+) -->\s*```json\n(.*?)```", text, re.S)
    return {name: json.loads(body) for name, body in blocks}


def test_the_doc_shows_each_policy_file_unchanged():
    shown = documented()
    assert sorted(shown) == sorted(POLICIES)
    for name in POLICIES:
        assert shown[name] == policy(name), name


def test_every_documented_policy_is_within_what_the_evaluator_implements():
    for name in POLICIES:
        for principal in (WORKER, CUSTODIAN, REVEAL, ADMIN, ROLE + "streams-bridge"):
            for action in ("kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:GenerateMac", "kms:DescribeKey"):
                decide(policy(name), Call(principal, action, USER))  # raises Unsupported otherwise


def test_the_symmetric_key_policy_separates_encrypt_and_decrypt_principals():
    p = policy("key-policy.json")
    assert allowed(p, Call(WORKER, "kms:GenerateDataKey", KEK))
    assert not allowed(p, Call(WORKER, "kms:GenerateDataKey", {**KEK, "deployment": "staging"}))
    assert not allowed(p, Call(WORKER, "kms:GenerateDataKey", {**KEK, "purpose": "user-key"}))
    assert not allowed(p, Call(WORKER, "kms:GenerateDataKey", {**KEK, "extra": "x"}))  # keys pinned
    assert not allowed(p, Call(WORKER, "kms:GenerateDataKey", None))
    assert decide(p, Call(WORKER, "kms:Decrypt", KEK)) == "deny"  # explicit, whatever else allows
    assert decide(p, Call(WORKER, "kms:ReEncryptFrom", KEK)) == "deny"  # a wildcard action
    assert allowed(p, Call(CUSTODIAN, "kms:Decrypt", KEK)) and not allowed(p, Call(CUSTODIAN, "kms:Decrypt", USER))
    assert allowed(p, Call(CUSTODIAN, "kms:Encrypt", USER))
    assert not allowed(p, Call(CUSTODIAN, "kms:Encrypt", {k: v for k, v in USER.items() if k != "user_id"}))
    assert allowed(p, Call(REVEAL, "kms:Decrypt", USER)) and not allowed(p, Call(REVEAL, "kms:Decrypt", KEK))
    assert decide(p, Call(REVEAL, "kms:GenerateDataKey", KEK)) == "implicit-deny"
    for principal in (WORKER, CUSTODIAN, REVEAL, ADMIN):
        assert allowed(p, Call(principal, "kms:DescribeKey"))
    assert not allowed(p, Call(ROLE + "streams-bridge", "kms:DescribeKey"))


def test_string_operators_and_null():
    def one(condition: dict, context: dict | None) -> bool:
        doc = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": "p"},
                    "Action": "kms:*",
                    "Resource": "*",
                    "Condition": condition,
                }
            ],
        }
        return allowed(doc, Call("p", "kms:Decrypt", context))

    key = "kms:EncryptionContext:purpose"
    assert one({"StringEquals": {key: ["a", "b"]}}, {"purpose": "b"})  # OR across values
    assert not one({"StringEquals": {key: "a"}}, {"purpose": "A"})  # values are case-sensitive
    assert one({"StringEquals": {"kms:encryptioncontext:PURPOSE": "a"}}, {"Purpose": "a"})  # key names are not
    assert not one({"StringEquals": {key: "a"}}, None)  # missing key: no match
    assert one({"StringNotEquals": {key: "a"}}, None)  # ... but a negated operator matches
    assert not one({"StringNotEquals": {key: "a"}}, {"purpose": "a"})
    assert one({"StringLike": {key: "user-*"}}, {"purpose": "user-kek"})
    assert not one({"StringLike": {key: "user-?"}}, {"purpose": "user-kek"})
    assert not one({"StringLike": {key: "[u]ser-kek"}}, {"purpose": "user-kek"})  # no [...] classes in IAM
    assert one({"StringNotLike": {key: "x*"}}, {"purpose": "user-kek"})
    assert one({"Null": {key: "true"}}, {"other": "x"}) and not one({"Null": {key: "true"}}, {"purpose": "x"})
    assert one({"Null": {key: "false"}}, {"purpose": "x"}) and not one({"Null": {key: "false"}}, None)
    both = {"StringEquals": {key: "a", "kms:EncryptionContext:deployment": "d"}}
    assert one(both, {"purpose": "a", "deployment": "d"}) and not one(both, {"purpose": "a"})  # AND across keys


def test_set_operators_on_the_context_keys():
    def one(condition: dict, context: dict | None) -> bool:
        doc = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*", "Condition": condition}
            ],
        }
        return allowed(doc, Call("anyone", "kms:Decrypt", context))

    keys = "kms:EncryptionContextKeys"
    all_of = {"ForAllValues:StringEquals": {keys: ["a", "b"]}}
    assert one(all_of, {"a": "1"}) and one(all_of, {"a": "1", "b": "2"})
    assert not one(all_of, {"a": "1", "c": "3"})
    assert one(all_of, None)  # IAM: ForAllValues holds for an empty set
    any_of = {"ForAnyValue:StringEquals": {keys: ["a"]}}
    assert one(any_of, {"a": "1", "c": "3"}) and not one(any_of, {"c": "3"}) and not one(any_of, None)
    assert one({"ForAnyValue:StringLike": {keys: "us*"}}, {"user_id": "u"})
    assert one({"Null": {keys: "true"}}, None) and not one({"Null": {keys: "true"}}, {"a": "1"})


@pytest.mark.parametrize(
    "condition",
    [
        {"StringEqualsIgnoreCase": {"kms:EncryptionContext:purpose": "a"}},
        {"StringEqualsIfExists": {"kms:EncryptionContext:purpose": "a"}},
        {"Bool": {"aws:SecureTransport": "true"}},
        {"StringEquals": {"kms:CallerAccount": "1"}},
        {"StringEquals": {"kms:EncryptionContextKeys": "a"}},  # multi-valued without a set operator
        {"ForAllValues:StringEquals": {"kms:EncryptionContext:purpose": "a"}},  # set operator on a single value
        {"ForAllValues:ArnLike": {"kms:EncryptionContextKeys": "a"}},
        {"Null": {"kms:EncryptionContext:purpose": "maybe"}},
    ],
)
def test_what_it_does_not_implement_is_refused_loudly(condition):
    doc = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*", "Condition": condition}],
    }
    with pytest.raises(Unsupported):
        decide(doc, Call("p", "kms:Decrypt", {"purpose": "a"}))


@pytest.mark.parametrize(
    "statement",
    [
        {"Effect": "Allow", "Principal": "*", "NotAction": "kms:Decrypt", "Resource": "*"},
        {"Effect": "Allow", "NotPrincipal": {"AWS": "p"}, "Action": "*", "Resource": "*"},
        {"Effect": "Allow", "Principal": {"Service": "s3.amazonaws.com"}, "Action": "*", "Resource": "*"},
        {"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "arn:aws:kms:*"},
        {"Effect": "Maybe", "Principal": "*", "Action": "*", "Resource": "*"},
    ],
)
def test_statement_shapes_it_does_not_implement_are_refused(statement):
    deny_first = {"Effect": "Deny", "Principal": "*", "Action": "*", "Resource": "*"}
    with pytest.raises(Unsupported):  # also after a Deny already matched
        decide({"Version": "2012-10-17", "Statement": [deny_first, statement]}, Call("p", "kms:Decrypt"))

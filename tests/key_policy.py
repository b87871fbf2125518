"""A small evaluator of AWS KMS key policies, for the subset deploy/kms/*.json use (test code).

moto does not evaluate key policies or their conditions, so the tests record the KMS
calls real processes make (operation, caller, EncryptionContext) and ask this evaluator
whether AWS would allow them under the documented policy. It implements only what it
can evaluate honestly and refuses everything else with ``Unsupported``, so a policy that
grows an operator or condition key it does not know makes the test fail, never pass:

- ``Effect`` Allow / Deny (an explicit Deny wins; no matching Allow is an implicit deny);
- ``Principal`` ``"*"`` or ``{"AWS": ARN or [ARNs]}``; ``Resource`` ``"*"`` only (in a key
  policy: the key it is attached to);
- ``Action`` a name or a list, with ``*`` and ``?`` wildcards, case-insensitive;
- ``Condition`` operators ``StringEquals``, ``StringNotEquals``, ``StringLike``,
  ``StringNotLike``, ``Null``, and ``ForAllValues:`` / ``ForAnyValue:`` with
  ``StringEquals`` or ``StringLike``; keys ``kms:EncryptionContext:<key>`` (single-valued;
  the context key's name is matched case-insensitively, its value case-sensitively, as
  AWS does) and ``kms:EncryptionContextKeys`` (multi-valued: set operators only).

Several values for one key: any may match (OR); several keys or operators: all must
(AND). A negated operator matches a missing key; ``ForAllValues`` matches an empty set,
``ForAnyValue`` does not (IAM's documented semantics).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import translate
from typing import Any

CONTEXT_PREFIX = "kms:encryptioncontext:"
CONTEXT_KEYS = "kms:encryptioncontextkeys"
STATEMENT_FIELDS = {"Sid", "Effect", "Principal", "Action", "Resource", "Condition"}
STRING_OPERATORS = {"StringEquals", "StringNotEquals", "StringLike", "StringNotLike"}
SET_OPERATORS = {"StringEquals", "StringLike"}


class Unsupported(Exception):
    """The policy uses something this evaluator does not implement: never guess."""


@dataclass(frozen=True)
class Call:
    """One KMS request as AWS would authorise it."""

    principal: str  # the caller's ARN, e.g. arn:aws:iam::ACCOUNT:role/streams-worker
    action: str  # kms:<Operation>
    context: Mapping[str, str] | None = None  # the request's EncryptionContext (None: none sent)
    note: str = field(default="", compare=False)  # where it came from, for messages


def _values(value: Any, what: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) for v in items):
        raise Unsupported(f"{what}: expected a string or a list of strings, got {value!r}")
    return items


def _glob(pattern: str, text: str, case_sensitive: bool) -> bool:
    flags = 0 if case_sensitive else re.IGNORECASE
    # fnmatch's [seq] classes are not IAM syntax: escape them so only * and ? are wildcards.
    escaped = pattern.replace("[", "[[]")
    return re.fullmatch(translate(escaped), text, flags) is not None


def _context_value(call: Call, name: str) -> str | None:
    """The request's value for context key ``name`` (the key matched case-insensitively)."""
    if not call.context:
        return None
    found = [v for k, v in call.context.items() if k.lower() == name.lower()]
    if len(found) > 1:
        raise Unsupported(f"the context of {call.note or call.action} has keys differing only by case: {name!r}")
    return found[0] if found else None


def _string_match(operator: str, wanted: list[str], value: str) -> bool:
    if operator in ("StringEquals", "StringNotEquals"):
        return value in wanted
    return any(_glob(w, value, case_sensitive=True) for w in wanted)


def _condition(operator: str, key: str, policy_value: Any, call: Call) -> bool:
    lowered = key.lower()
    set_op = None
    if ":" in operator and operator.split(":", 1)[0] in ("ForAllValues", "ForAnyValue"):
        set_op, operator = operator.split(":", 1)
    if operator.endswith("IfExists"):
        raise Unsupported(f"condition operator {operator!r} (…IfExists) is not implemented")
    if lowered == CONTEXT_KEYS:
        if operator == "Null" and set_op is None:
            present = bool(call.context)
        elif set_op is None:
            raise Unsupported(f"{operator} on the multi-valued {key}: use ForAllValues:/ForAnyValue:")
        elif operator not in SET_OPERATORS:
            raise Unsupported(f"condition operator {set_op}:{operator!r} is not implemented")
        else:
            wanted = _values(policy_value, f"{set_op}:{operator} {key}")
            keys = list(call.context or {})
            hits = [_string_match(operator, wanted, k) for k in keys]
            return all(hits) if set_op == "ForAllValues" else any(hits)
    elif lowered.startswith(CONTEXT_PREFIX) and len(lowered) > len(CONTEXT_PREFIX):
        if set_op is not None:
            raise Unsupported(f"{set_op}: on the single-valued {key} is not implemented (IAM warns against it)")
        value = _context_value(call, key[len(CONTEXT_PREFIX) :])
        present = value is not None
        if operator in STRING_OPERATORS:
            wanted = _values(policy_value, f"{operator} {key}")
            if value is None:
                return operator in ("StringNotEquals", "StringNotLike")
            matched = _string_match(operator, wanted, value)
            return not matched if operator in ("StringNotEquals", "StringNotLike") else matched
        if operator != "Null":
            raise Unsupported(f"condition operator {operator!r} is not implemented")
    else:
        raise Unsupported(f"condition key {key!r} is not implemented (only kms:EncryptionContext*)")
    # Null: "true" asks for the key to be absent, "false" for it to be present.
    flags = [
        v.lower() if isinstance(v, str) else v
        for v in (policy_value if isinstance(policy_value, list) else [policy_value])
    ]
    if not flags or not all(f in ("true", "false", True, False) for f in flags):
        raise Unsupported(f"Null {key}: expected true or false, got {policy_value!r}")
    return any((f in ("true", True)) != present for f in flags)


def _conditions(block: Any, call: Call) -> bool:
    if block is None:
        return True
    if not isinstance(block, dict):
        raise Unsupported(f"Condition must be an object, got {block!r}")
    for operator, pairs in block.items():
        if not isinstance(pairs, dict) or not pairs:
            raise Unsupported(f"Condition {operator!r} must map condition keys to values")
        for key, value in pairs.items():
            if not _condition(operator, key, value, call):
                return False
    return True


def _principal_matches(principal: Any, caller: str) -> bool:
    if principal == "*":
        return True
    if not isinstance(principal, dict) or set(principal) != {"AWS"}:
        raise Unsupported(f'Principal {principal!r}: only "*" or {{"AWS": ...}} is implemented')
    names = _values(principal["AWS"], "Principal AWS")
    return "*" in names or caller in names


def _statement_applies(statement: dict, call: Call) -> bool:
    unknown = set(statement) - STATEMENT_FIELDS
    if unknown:
        raise Unsupported(f"statement {statement.get('Sid', '?')}: {sorted(unknown)} not implemented")
    if statement.get("Effect") not in ("Allow", "Deny"):
        raise Unsupported(f"statement {statement.get('Sid', '?')}: Effect must be Allow or Deny")
    if statement.get("Resource") != "*":
        raise Unsupported(f'statement {statement.get("Sid", "?")}: only Resource "*" (this key) is implemented')
    if "Principal" not in statement or "Action" not in statement:
        raise Unsupported(f"statement {statement.get('Sid', '?')}: needs Principal and Action")
    if not _principal_matches(statement["Principal"], call.principal):
        return False
    actions = _values(statement["Action"], "Action")
    if not any(_glob(a, call.action, case_sensitive=False) for a in actions):
        return False
    return _conditions(statement.get("Condition"), call)


def decide(policy: dict, call: Call) -> str:
    """``"allow"``, ``"deny"`` (an explicit Deny matched) or ``"implicit-deny"`` (no Allow matched)."""
    if set(policy) - {"Version", "Id", "Statement"} or policy.get("Version") != "2012-10-17":
        raise Unsupported("a policy has Version 2012-10-17, an optional Id, and Statement")
    statements = policy["Statement"]
    if not isinstance(statements, list):
        raise Unsupported("Statement must be a list")
    # Every statement is evaluated (so an unsupported one is refused even after a Deny matched).
    effects = [s["Effect"] for s in statements if _statement_applies(s, call)]
    if "Deny" in effects:
        return "deny"
    return "allow" if "Allow" in effects else "implicit-deny"


def allowed(policy: dict, call: Call) -> bool:
    return decide(policy, call) == "allow"

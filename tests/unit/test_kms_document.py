"""Issue 19 item 1, the pure part: which stored documents a process accepts, and the check value."""

from __future__ import annotations

import json

import pytest

from streams.errors import ConfigError
from streams.privacy import keys, kms
from streams.settings import load_settings


class NeverCalled:
    """Stands for a configured KMS in paths that must refuse before any KMS call."""

    def unwrap(self, doc, source):  # pragma: no cover - reaching it is the failure
        raise AssertionError("the KMS must not be asked")


WRAPPED = json.dumps({"format": kms.FORMAT, "kms_key_arn": "arn:x", "data_key": "", "keyring": ""})


def test_a_wrapped_document_without_a_kms_is_refused_naming_the_setting():
    with pytest.raises(keys.KeyMaterialError, match="set STREAMS_KMS_KEY_ID"):
        keys.plaintext(WRAPPED, "keys.json", None)


def test_a_plaintext_document_with_a_kms_is_refused_naming_the_migration():
    text = json.dumps(keys.generate_document())
    with pytest.raises(keys.KeyMaterialError, match="run `streams keys migrate` once") as refused:
        keys.plaintext(text, "keys.json", NeverCalled())  # type: ignore[arg-type]
    assert "\n" not in str(refused.value)
    assert keys.plaintext(text, "keys.json", None) == text  # no KMS configured: as before


def test_the_check_value_names_the_context():
    key = bytes(32)
    one = {"deployment": "prod", "purpose": "keyring"}
    assert kms._check(key, one) == kms._check(key, dict(one))
    assert kms._check(key, one) != kms._check(key, {**one, "deployment": "staging"})
    assert kms._check(key, one) != kms._check(bytes([1]) * 32, one)


def test_the_deployment_name_is_checked(monkeypatch):
    monkeypatch.setenv("STREAMS_DEPLOYMENT", "bad name with spaces")
    with pytest.raises(ConfigError, match="STREAMS_DEPLOYMENT"):
        load_settings()


def test_compose_wraps_the_key_file_with_its_kms():
    from pathlib import Path

    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["kms"]["image"] == "motoserver/moto:5.2.6"
    assert services["kms-keys"]["depends_on"]["kms"] == {"condition": "service_healthy"}
    env = services["worker"]["environment"]
    assert env["STREAMS_KMS_KEY_ID"] and env["STREAMS_KMS_ENDPOINT"] == "http://kms:5000"
    assert services["worker"]["depends_on"]["kms"] == {"condition": "service_healthy"}

"""Key documents: rotation edits, validation, and refusal to edit env-provided keys."""

import json

import pytest

from streams import keys
from streams.keys import KeyMaterialError, parse_keyring


def test_encryption_rotation_adds_an_active_key_and_keeps_the_old_one():
    doc = keys.generate_document()
    assert keys.add_encryption_key(doc) == "k2"
    ring = parse_keyring(json.dumps(doc), "t")
    assert ring.encryption_key_id == "k2" and set(ring.encryption_keys) == {"k1", "k2"}
    assert ring.encryption_keys["k1"] != ring.encryption_keys["k2"]


def test_join_rotation_adds_a_pending_version_without_switching_writes():
    doc = keys.generate_document()
    assert keys.add_join_version(doc) == "h2"
    ring = parse_keyring(json.dumps(doc), "t")
    assert (ring.join_version, ring.join_next) == ("h1", "h2")
    with pytest.raises(KeyMaterialError, match="rejoin"):
        keys.add_join_version(doc)


def test_next_must_have_keys():
    doc = keys.generate_document()
    doc["join"]["next"] = "h7"
    with pytest.raises(KeyMaterialError, match="join.next"):
        parse_keyring(json.dumps(doc), "t")


def test_describe_never_holds_key_bytes():
    doc = keys.generate_document()
    text = json.dumps(parse_keyring(json.dumps(doc), "t").describe())
    for value in [doc["encryption"]["keys"]["k1"], *doc["join"]["versions"]["h1"].values()]:
        assert value not in text


def test_next_id_counts_past_the_highest():
    assert keys.next_id(["k1", "k9", "x"], "k") == "k10"


def test_env_keys_are_not_edited_by_commands(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    keys.write_document(path, keys.generate_document())
    monkeypatch.setenv("STREAMS_KEYS_JSON", path.read_text())
    with pytest.raises(KeyMaterialError, match="secret store"):
        keys.editable_document(path)


def test_missing_key_file_is_not_generated_when_asked_not_to(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMS_KEYS_JSON", raising=False)
    with pytest.raises(KeyMaterialError, match="keys init"):
        keys.load_keyring(tmp_path / "none.json", generate_dev_key=False)
    assert not (tmp_path / "none.json").exists()


def test_key_file_is_owner_only(tmp_path):
    path = tmp_path / "keys.json"
    keys.write_document(path, keys.generate_document())
    assert path.stat().st_mode & 0o777 == 0o600

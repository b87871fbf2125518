"""Key documents: rotation edits, validation, and refusal to edit env-provided keys."""

import json

import pytest

from streams.privacy import keys
from streams.privacy.keys import KeyMaterialError, parse_keyring


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
    with pytest.raises(KeyMaterialError, match="secret store"):
        keys.editable_document(path, keys_json=path.read_text())


def test_missing_key_file_fails_closed_without_the_dev_flag(tmp_path):
    with pytest.raises(KeyMaterialError, match="keys init"):
        keys.load_keyring(tmp_path / "none.json")
    assert not (tmp_path / "none.json").exists()


def test_key_file_is_owner_only(tmp_path):
    path = tmp_path / "keys.json"
    keys.write_document(path, keys.generate_document())
    assert path.stat().st_mode & 0o777 == 0o600


def test_dev_flag_generates_a_key_file_once(tmp_path):
    path = tmp_path / "keys.json"
    ring = keys.load_keyring(path, dev_keys=True)
    assert path.stat().st_mode & 0o777 == 0o600
    assert keys.load_keyring(path, dev_keys=True) == ring


def test_racing_publishers_all_load_the_one_file_that_won(tmp_path):
    """Workers starting together on one empty volume (compose --scale) end with one key."""
    import threading

    path = tmp_path / "keys.json"
    rings, barrier = [], threading.Barrier(8)

    def start_worker():
        barrier.wait()
        rings.append(keys.load_keyring(path, dev_keys=True))

    threads = [threading.Thread(target=start_worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(rings) == 8 and all(r == rings[0] for r in rings)
    assert rings[0] == keys.parse_keyring(path.read_text(), "final")
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no temp files left


def test_publish_never_overwrites(tmp_path):
    path = tmp_path / "keys.json"
    assert keys.publish_document(path, keys.generate_document())
    before = path.read_text()
    assert not keys.publish_document(path, keys.generate_document())
    assert path.read_text() == before


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o666])
def test_key_file_open_to_others_is_refused(tmp_path, mode):
    path = tmp_path / "keys.json"
    keys.write_document(path, keys.generate_document())
    path.chmod(mode)
    with pytest.raises(KeyMaterialError, match="chmod"):
        keys.load_keyring(path)


def test_group_readable_key_file_is_allowed(tmp_path):
    """Kubernetes Secret volumes with fsGroup are 0440."""
    path = tmp_path / "keys.json"
    keys.write_document(path, keys.generate_document())
    path.chmod(0o440)
    assert keys.load_keyring(path).encryption_key_id == "k1"

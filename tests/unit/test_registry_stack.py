"""The registry stack service's pure parts: which Java it runs on, and its URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams_dev.stack import SERVICES, StackError
from streams_dev.stack.registry import Registry, find_java, registry_url


def jdk(root: Path, name: str, version: str) -> Path:
    home = root / name
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "java").write_text("")
    (home / "release").write_text(f'JAVA_VERSION="{version}"\nIMPLEMENTOR="test"\n')
    return home


def test_the_newest_java_21_or_later_is_chosen(tmp_path, monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    jdk(tmp_path, "java-17", "17.0.15")
    jdk(tmp_path, "jdk-21", "21.0.2")
    newest = jdk(tmp_path, "temurin-25", "25.0.3")
    assert find_java(jvm=tmp_path) == str(newest / "bin" / "java")


def test_no_java_21_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    jdk(tmp_path, "java-17", "17.0.15")
    with pytest.raises(StackError, match="needs Java 21 or newer") as err:
        find_java(jvm=tmp_path)
    assert "\n" not in str(err.value)


def test_java_home_counts_too(tmp_path, monkeypatch):
    home = jdk(tmp_path / "elsewhere", "jdk", "22")
    monkeypatch.setenv("JAVA_HOME", str(home))
    assert find_java(jvm=tmp_path / "none") == str(home / "bin" / "java")


def test_the_registry_is_a_stack_service_with_its_ccompat_url():
    assert SERVICES["registry"] is Registry
    assert registry_url(8081) == "http://127.0.0.1:8081/apis/ccompat/v7"

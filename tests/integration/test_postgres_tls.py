"""PostgreSQL over TLS through the DSN alone (``sslmode=verify-full&sslrootcert=...``).

The server is the distribution's PostgreSQL (pgserver has no OpenSSL) with ``ssl=on``, a
certificate for 127.0.0.1/localhost from a local CA, and ``hostssl``-only password
authentication, on a free port in a folder of its own (``streams_dev.stack.tls_postgres``).
Kafka and SQS are the shared stack's.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from streams_dev.sandbox import _free_ports, create_database
from streams_dev.stack.tls_postgres import TlsPostgres
from streams_dev.tls import LocalCA
from tests.helpers import isolated_pipeline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def tls_postgres():
    """(server, the CA that signed its certificate, a CA that did not)."""
    workdir = Path(tempfile.mkdtemp(prefix="streams-tls-pg-"))
    workdir.chmod(0o755)  # the postgres user walks into it
    ca = LocalCA(workdir / "tls")
    rogue = LocalCA(workdir / "rogue", "rogue-ca")
    server = TlsPostgres(workdir / "pg", _free_ports(1)[0], ca.issue("postgres"), secrets.token_urlsafe(12))
    try:
        server.start()
        yield server, ca.cert_file, rogue.cert_file
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def tls_database(tls_postgres):
    server, ca, _ = tls_postgres
    name = f"tls{uuid.uuid4().hex[:10]}"
    asyncio.run(create_database(server.dsn(rootcert=ca), name))
    return name


def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_migrate_and_the_sink_run_over_verified_tls(tls_postgres, tls_database, stack_settings, tmp_path, sample_path):
    server, ca, _ = tls_postgres
    dsn = server.dsn(tls_database, rootcert=ca)
    p = isolated_pipeline(stack_settings, tmp_path, STREAMS_PG_DSN=dsn)
    try:
        migrated = p.run("migrate")
        assert migrated.returncode == 0, migrated.stderr
        assert "0001_init.sql" in migrated.stdout and "0004_worker_role.sql" in migrated.stdout
        assert server.password not in migrated.stdout + migrated.stderr
        tls = p.query("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")[0]
        assert tls["ssl"] is True and tls["version"].startswith("TLSv1.")

        sample = [r for r in json.loads(sample_path.read_text()) if "foo" not in r][:20]
        p.send(sample)
        bridge = p.start("bridge")
        worker = p.start("worker")
        p.wait_for(lambda: p.row_count() == len(sample), 120, f"{len(sample)} rows over TLS")
        assert p.stop(bridge) == 0
        assert p.stop(worker) == 0
        assert server.password not in p.logs()
    finally:
        p.stop_all()


@pytest.mark.parametrize("command", [("migrate",), ("worker",)])
def test_an_untrusted_server_certificate_is_one_line(tls_postgres, tls_database, stack_settings, tmp_path, command):
    server, _, rogue = tls_postgres
    p = isolated_pipeline(
        stack_settings, tmp_path, STREAMS_PG_DSN=server.dsn(tls_database, rootcert=rogue), STREAMS_STAGES="sink"
    )
    result = p.run(*command, STREAMS_LOG_LEVEL="WARNING", timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_line(result)
    assert "not trusted" in line and "sslrootcert" in line and "STREAMS_PG_DSN" in line
    assert server.password not in result.stdout + result.stderr


def test_plaintext_is_refused_by_the_server_in_one_line(tls_postgres, tls_database, stack_settings, tmp_path):
    server, _, _ = tls_postgres
    p = isolated_pipeline(stack_settings, tmp_path, STREAMS_PG_DSN=server.dsn(tls_database, sslmode="disable"))
    result = p.run("migrate", timeout=60)
    assert result.returncode == 2
    line = one_line(result)
    assert "STREAMS_PG_DSN" in line and server.password not in result.stderr

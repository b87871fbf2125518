"""Apicurio Registry 3.3.3: the local stack's schema registry, with its Confluent-compatible API.

- **Artifact**: ``io.apicurio:apicurio-registry-app:3.3.3``, the ``tar.gz`` with classifier
  ``all`` (a Quarkus fast-jar app) from Maven Central through the pinned
  ``poms/apicurio/pom.xml``; downloaded and unpacked once under ``STREAMS_STACK_CACHE_DIR``,
  like the Kafka jars.
- **Java**: it needs Java 21 or newer (the stack's Kafka runs on the default Java 17);
  ``find_java`` picks the newest JDK in ``JAVA_HOME`` or ``/usr/lib/jvm`` (Temurin 25 here).
- **Storage**: persistent, in the stack's PostgreSQL, database ``apicurio_registry`` of its
  own (``apicurio.storage.kind=sql``, ``apicurio.storage.sql.kind=postgresql``). The default
  in-memory storage would hand out the same ids for other schemas after a restart, and
  records would decode wrongly without an error. So it starts after PostgreSQL is up.
- **API**: ``http://127.0.0.1:<STREAMS_REGISTRY_PORT>/apis/ccompat/v7`` (what
  ``STREAMS_SCHEMA_REGISTRY_URL`` names, see ``url``). Its ids are content ids. Ready once
  ``GET /subjects`` answers. The management interface (health, metrics) is on loopback,
  on a port the JVM picks.

Other tools (Kafka Connect's converters, tests) get the URL with ``Registry(settings).url``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .process import LOOPBACK, NotReady, Service, StackError, ensure_jars, file_lock, port_open, spawn

VERSION = "3.3.3"
POM = Path(__file__).resolve().parent / "poms" / "apicurio" / "pom.xml"
DATABASE = "apicurio_registry"
API_PATH = "/apis/ccompat/v7"
MIN_JAVA = 21


def _java_major(home: Path) -> int | None:
    """The major version of the JDK/JRE at ``home`` (from its ``release`` file)."""
    try:
        text = (home / "release").read_text()
    except OSError:
        return None
    match = re.search(r'^JAVA_VERSION="(\d+)', text, re.MULTILINE)
    return int(match.group(1)) if match else None


def find_java(minimum: int = MIN_JAVA, jvm: Path = Path("/usr/lib/jvm")) -> str:
    """The ``java`` of the newest JDK at least ``minimum`` (JAVA_HOME first, then /usr/lib/jvm)."""
    homes = [Path(os.environ["JAVA_HOME"])] if os.environ.get("JAVA_HOME") else []
    if jvm.is_dir():
        homes += sorted(p for p in jvm.iterdir() if p.is_dir() and not p.is_symlink())
    found = [
        (major, home)
        for home in homes
        if (major := _java_major(home)) is not None and major >= minimum and (home / "bin" / "java").is_file()
    ]
    if not found:
        raise StackError(
            f"Apicurio Registry needs Java {minimum} or newer, none in JAVA_HOME or /usr/lib/jvm: "
            "install one (e.g. apt-get install openjdk-21-jre-headless) or set JAVA_HOME"
        )
    return str(max(found)[1] / "bin" / "java")


def registry_url(port: int) -> str:
    """The Confluent-compatible API of a local Apicurio (the value of STREAMS_SCHEMA_REGISTRY_URL)."""
    return f"http://{LOOPBACK}:{port}{API_PATH}"


class Registry(Service):
    """``database`` moves its storage (tests run a private registry beside the stack's)."""

    name = "registry"
    ready_timeout = 120.0  # a Quarkus JVM on a busy 2-core machine, after PostgreSQL

    def __init__(self, settings, database: str = DATABASE) -> None:
        super().__init__(settings)
        self.database = database

    @property
    def port(self) -> int:
        return self.settings.registry_port

    def ports(self) -> list[tuple[int, str]]:
        return [(self.settings.registry_port, "STREAMS_REGISTRY_PORT")]

    @property
    def url(self) -> str:
        return registry_url(self.port)

    @property
    def marker(self) -> str:
        return str(self.dir)  # argv: -Dstreams.stack.service=<dir>

    @property
    def app_dir(self) -> Path:
        return self.cache_dir / f"apicurio-registry-{VERSION}" / "app"

    @property
    def jdbc_url(self) -> str:
        return f"jdbc:postgresql://{LOOPBACK}:{self.settings.pg_port}/{self.database}"

    def detail(self) -> str:
        return f"API {self.url}, storage {LOOPBACK}:{self.settings.pg_port}/{self.database}, log {self.log_file}"

    # -- start -----------------------------------------------------------------
    def prepare(self) -> None:
        self._java = find_java()
        self._unpack()
        self._create_database()

    def _unpack(self) -> None:
        """Download the tarball once (maven, cached) and unpack it next to it, once."""
        download = self.app_dir.parent / "download"
        ensure_jars(POM, download, self.dir / "maven.log", pattern="*.tar.gz")
        marker = self.app_dir / ".complete"
        if marker.exists():
            return
        with file_lock(self.app_dir.parent / ".unpack.lock"):
            if marker.exists():
                return
            staging = self.app_dir.with_name("app.partial")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            (tarball,) = download.glob("*.tar.gz")
            with tarfile.open(tarball) as tar:
                tar.extractall(staging, filter="data")
            if not (staging / "quarkus-run.jar").is_file():
                raise StackError(f"{tarball} holds no quarkus-run.jar: delete {download} and retry")
            (staging / ".complete").write_text(VERSION + "\n")
            shutil.rmtree(self.app_dir, ignore_errors=True)
            staging.rename(self.app_dir)

    def _create_database(self) -> None:
        """Its own database on the stack's PostgreSQL (waiting for PostgreSQL if it starts too)."""
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                asyncio.run(self._ensure_database())
                return
            except Exception as exc:  # connect refused while PostgreSQL starts, asyncpg's "starting up"
                if time.monotonic() >= deadline:
                    raise StackError(
                        f"registry: PostgreSQL at {LOOPBACK}:{self.settings.pg_port} not usable "
                        f"({type(exc).__name__}): start it first (`streams stack up`)"
                    ) from None
                time.sleep(0.5)

    async def _ensure_database(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(
            host=LOOPBACK, port=self.settings.pg_port, user="postgres", database="postgres", timeout=5
        )
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", self.database):
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # a concurrent start
                    await conn.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await conn.close()

    def launch(self) -> subprocess.Popen:
        props = {
            "streams.stack.service": str(self.dir),  # the marker: which stack this process belongs to
            "quarkus.http.host": LOOPBACK,
            "quarkus.http.port": str(self.port),
            "quarkus.management.host": LOOPBACK,
            "quarkus.management.port": "0",
            "quarkus.http.access-log.enabled": "false",
            "apicurio.storage.kind": "sql",
            "apicurio.storage.sql.kind": "postgresql",
            "apicurio.datasource.url": self.jdbc_url,
            "apicurio.datasource.username": "postgres",
            "apicurio.datasource.password": "",
            # The default pool (20 connections held) would take a fifth of PostgreSQL's 100.
            "apicurio.datasource.jdbc.initial-size": "2",
            "apicurio.datasource.jdbc.min-size": "2",
            "apicurio.datasource.jdbc.max-size": "10",
        }
        argv = [
            self._java,
            "-Xmx384m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",  # start-up over peak speed: a handful of requests per run
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            *(f"-D{k}={v}" for k, v in props.items()),
            "-jar",
            str(self.app_dir / "quarkus-run.jar"),
        ]
        return spawn(argv, pid_file=self.pid_file, log_file=self.log_file, cwd=self.dir)

    def probe(self, timeout: float) -> None:
        """``GET /subjects`` on the Confluent-compatible API: storage and HTTP both up."""
        if not port_open(self.port):
            raise NotReady(f"port {self.port} not accepting connections yet")
        try:
            with urllib.request.urlopen(f"{self.url}/subjects", timeout=timeout) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            raise NotReady(f"GET {API_PATH}/subjects failed: {exc}") from None

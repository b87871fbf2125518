"""Kafka Connect 3.9.1 in distributed mode on loopback: the third-party consumer of the masked topic.

Only the tests that need it start it (pytest marker ``connect``); ``streams stack up`` does
not. One worker per test run, with its own group id and its own config/offset/status
topics on the shared Kafka, so runs never see each other's connectors.

Jars come from Maven Central through two pinned poms (package data), cached once outside
the work tree like the Kafka jars: ``poms/connect`` (the worker) and ``poms/connect-plugins``
(the Debezium JDBC sink's plugin archive and Apicurio's converter). The plugins are laid
out as one directory per plugin under ``plugin.path``, so each gets its own class loader.
The settings that matter to users (worker properties, connector config) are the shipped
files in deploy/connect/; a run only changes addresses and names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path

from streams_dev.stack.process import (
    LOOPBACK,
    MARKER,
    NotReady,
    Service,
    StackError,
    ensure_jars,
    file_lock,
    port_open,
    require_java,
    spawn,
)

VERSION = "3.9.1"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "connect"  # a source checkout's
WORKER_PROPERTIES = DEPLOY / "worker.properties"
SINK_CONFIG = DEPLOY / "jdbc-sink.json"
CCOMPAT_PATH = "/apis/ccompat/v7"
POMS = Path(__file__).resolve().parent / "stack" / "poms"
WORKER_POM = POMS / "connect" / "pom.xml"
PLUGINS_POM = POMS / "connect-plugins" / "pom.xml"
JDBC_SINK_ARCHIVE = "debezium-connector-jdbc-*-plugin.tar.gz"
JDBC_SINK_CLASS = "io.debezium.connector.jdbc.JdbcSinkConnector"
AVRO_CONVERTER_CLASS = "io.apicurio.registry.utils.converter.AvroConverter"
CONVERTER_SERVICE = "org.apache.kafka.connect.storage.Converter"
LAYOUT = "2"  # bump when ensure_plugins lays plugin.path out differently


def read_properties(path: Path) -> dict[str, str]:
    """``key=value`` lines of a Java properties file (comments and blanks skipped; no continuations)."""
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def apicurio_api_url(schema_registry_url: str) -> str:
    """The Apicurio core v2 API the converter needs, from the Confluent API URL the workers use
    (``STREAMS_SCHEMA_REGISTRY_URL``, ``http://host:port/apis/ccompat/v7``)."""
    base = schema_registry_url.rstrip("/")
    if not base.endswith(CCOMPAT_PATH):
        raise StackError(f"not an Apicurio Confluent API URL (no {CCOMPAT_PATH} suffix): {schema_registry_url}")
    return base.removesuffix(CCOMPAT_PATH) + "/apis/registry/v2"


def sink_config(*, topic: str, pg_dsn: str, table: str) -> dict[str, str]:
    """The shipped ``deploy/connect/jdbc-sink.json`` with this deployment's topic, database and table."""
    dsn = urllib.parse.urlsplit(pg_dsn)
    return {
        **json.loads(SINK_CONFIG.read_text()),
        "topics": topic,
        "connection.url": f"jdbc:postgresql://{dsn.hostname}:{dsn.port or 5432}{dsn.path}",
        "connection.username": urllib.parse.unquote(dsn.username or ""),
        "connection.password": urllib.parse.unquote(dsn.password or ""),
        "collection.name.format": table,
    }


def ensure_plugins(cache_dir: Path, log_file: Path) -> Path:
    """The ``plugin.path`` directory, laid out once per plugins pom: one folder per plugin.

    - ``debezium-connector-jdbc/``: the connector's published archive, unpacked as is;
    - ``apicurio-registry-converter/``: the converter jar and its dependencies, plus the
      ServiceLoader manifest its 2.6 jar lacks (what Kafka's ``connect-plugin-path
      sync-manifests`` writes), so the worker can use ``plugin.discovery=service_load``:
      ~3 s of plugin loading instead of a reflective scan of every class (~10-30 s here).
    """
    digest = hashlib.sha256(PLUGINS_POM.read_bytes() + LAYOUT.encode()).hexdigest()
    target = cache_dir / "connect-plugin-path"
    marker = target / MARKER
    if marker.exists() and marker.read_text().strip() == digest:
        return target
    downloads = ensure_jars(PLUGINS_POM, cache_dir / "connect-plugins", log_file)
    with file_lock(cache_dir / ".connect-plugins.lock"):
        if marker.exists() and marker.read_text().strip() == digest:
            return target
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        converter = staging / "apicurio-registry-converter"
        converter.mkdir(parents=True)
        archives = sorted(downloads.glob(JDBC_SINK_ARCHIVE))
        if len(archives) != 1:
            raise StackError(f"expected one {JDBC_SINK_ARCHIVE} in {downloads}: delete it and retry")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(staging, filter="data")  # a top-level debezium-connector-jdbc/ folder
        for jar in downloads.glob("*.jar"):
            shutil.copy2(jar, converter / jar.name)
        with zipfile.ZipFile(converter / "streams-service-manifests.jar", "w") as manifests:
            manifests.writestr(f"META-INF/services/{CONVERTER_SERVICE}", AVRO_CONVERTER_CLASS + "\n")
        (staging / MARKER).write_text(digest + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


class ConnectError(StackError):
    """A Connect REST call failed; the message names the call and Connect's answer."""


class ConnectWorker(Service):
    """One distributed-mode Connect worker whose files live in ``workdir``.

    Its settings are the shipped ``deploy/connect/worker.properties`` (string keys, values
    in the Confluent wire format read by Apicurio's converter, read_committed), with this
    run's Kafka, REST port, group, internal topics, plugin path and ``registry_url`` (the
    Confluent API URL the stages use; the converter gets the same registry's core API).
    """

    name = "connect"
    ready_timeout = 180.0

    def __init__(self, settings, workdir: Path, *, rest_port: int, registry_url: str, tag: str | None = None) -> None:
        super().__init__(settings)
        self.dir = Path(workdir).resolve()
        self.rest_port = rest_port
        self.registry_url = apicurio_api_url(registry_url)
        self.tag = tag or f"connect-{uuid.uuid4().hex[:10]}"
        self.ready_in: float | None = None

    # -- identity --------------------------------------------------------------
    @property
    def port(self) -> int:
        return self.rest_port

    def ports(self) -> list[tuple[int, str]]:
        return [(self.rest_port, "the rest_port argument")]

    @property
    def config_file(self) -> Path:
        return self.dir / "connect-distributed.properties"

    @property
    def marker(self) -> str:
        return str(self.config_file)

    @property
    def stdout_file(self) -> Path:
        return self.dir / "connect.out"

    @property
    def logs(self) -> tuple[Path, ...]:
        return (self.log_file, self.stdout_file)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.rest_port}"

    @property
    def topics(self) -> dict[str, str]:
        """The worker's internal topics, unique to this worker's group."""
        return {
            "config.storage.topic": f"{self.tag}.configs",
            "offset.storage.topic": f"{self.tag}.offsets",
            "status.storage.topic": f"{self.tag}.status",
        }

    # -- start -----------------------------------------------------------------
    def start(self) -> int:
        """Start and wait until ready; ``ready_in`` keeps the seconds it took (for reports)."""
        began = time.monotonic()
        pid = super().start()
        self.ready_in = time.monotonic() - began
        return pid

    def prepare(self) -> None:
        self._java = require_java()
        self.jar_dir = ensure_jars(WORKER_POM, self.cache_dir / f"connect-{VERSION}", self.dir / "maven.log")
        self.plugin_path = ensure_plugins(self.cache_dir, self.dir / "maven.log")
        self._write_config()

    def _write_config(self) -> None:
        """The shipped ``deploy/connect/worker.properties``, with this run's addresses and names."""
        lines = {
            **read_properties(WORKER_PROPERTIES),
            "bootstrap.servers": self.settings.kafka_bootstrap,
            "group.id": self.tag,
            **self.topics,
            "listeners": self.url,
            "plugin.path": str(self.plugin_path),
            "value.converter.apicurio.registry.url": self.registry_url,
            # Test-speed settings, not for production: small internal topics, quick flushes,
            # and no wait for a departed member before reassigning (there is one worker).
            "offset.storage.partitions": "1",
            "status.storage.partitions": "1",
            "offset.flush.interval.ms": "1000",
            "scheduled.rebalance.max.delay.ms": "0",
            "rest.advertised.host.name": LOOPBACK,
            "rest.advertised.port": str(self.rest_port),
        }
        self.config_file.write_text(
            "# Generated by streams_dev.connect on every start; edits are overwritten.\n"
            + "".join(f"{k}={v}\n" for k, v in lines.items())
        )
        (self.dir / "log4j.properties").write_text(
            "\n".join(
                [
                    "log4j.rootLogger=INFO, file",
                    "log4j.appender.file=org.apache.log4j.RollingFileAppender",
                    f"log4j.appender.file.File={self.log_file}",
                    "log4j.appender.file.MaxFileSize=20MB",
                    "log4j.appender.file.MaxBackupIndex=2",
                    "log4j.appender.file.layout=org.apache.log4j.PatternLayout",
                    "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n",
                    "log4j.logger.org.apache.kafka.clients=WARN",
                    "log4j.logger.org.reflections=ERROR",
                    "",
                ]
            )
        )

    def launch(self) -> subprocess.Popen:
        return spawn(
            [
                self._java,
                "-Xmx512m",
                "-XX:+ExitOnOutOfMemoryError",
                "-Djava.awt.headless=true",
                f"-Dlog4j.configuration=file:{self.dir / 'log4j.properties'}",
                "-cp",
                f"{self.jar_dir}/*",
                "org.apache.kafka.connect.cli.ConnectDistributed",
                str(self.config_file),
            ],
            pid_file=self.pid_file,
            log_file=self.stdout_file,
            cwd=self.dir,
        )

    # -- readiness -------------------------------------------------------------
    def probe(self, timeout: float) -> None:
        """Ready = the herder answers (it joined its group) and both plugins are loaded."""
        if not port_open(self.rest_port):
            raise NotReady(f"REST port {self.rest_port} not accepting connections yet")
        try:
            self.request("GET", "/connectors", timeout=timeout)
            plugins = self.request("GET", "/connector-plugins?connectorsOnly=false", timeout=timeout)
        except ConnectError as exc:
            raise NotReady(str(exc)) from None
        classes = {p["class"] for p in plugins}
        missing = {JDBC_SINK_CLASS, AVRO_CONVERTER_CLASS} - classes
        if missing:
            raise StackError(f"connect loaded no {', '.join(sorted(missing))}: see {self.log_file}")

    # -- REST ------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 10.0):
        """One REST call; the decoded JSON answer (None when empty), ConnectError otherwise."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise ConnectError(f"{method} {path}: HTTP {exc.code} {detail}") from None
        except OSError as exc:
            raise ConnectError(f"{method} {path}: {exc}") from None
        return json.loads(text) if text else None

    def put_connector(self, name: str, config: dict[str, str], timeout: float = 60.0) -> None:
        """Create or update a connector; retried while the worker rebalances (HTTP 409)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.request("PUT", f"/connectors/{name}/config", {**config, "name": name})
                return
            except ConnectError as exc:
                if "HTTP 409" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.5)

    def connector_state(self, name: str) -> tuple[str, list[dict]]:
        """(connector state, task statuses); ``("MISSING", [])`` before it exists."""
        try:
            status = self.request("GET", f"/connectors/{name}/status")
        except ConnectError as exc:
            if "HTTP 404" in str(exc):
                return "MISSING", []
            raise
        return status["connector"]["state"], status.get("tasks", [])

    def delete_topics(self) -> None:
        """Remove the worker's internal topics (after stop), so test runs leave none behind."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap})
        for fut in admin.delete_topics(list(self.topics.values()), operation_timeout=30).values():
            with contextlib.suppress(Exception):
                fut.result(30)

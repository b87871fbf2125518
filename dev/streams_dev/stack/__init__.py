"""The local process stack: Kafka, PostgreSQL, an SQS server, a schema registry and a KMS (moto) as plain
processes on loopback.

No Docker: each service is a detached process whose pid file, config and log
live in ``settings.stack_dir/<service>``. ``up`` is idempotent (a running
service is only re-probed), returns only once every service answers a real
request, and ``down`` leaves no process behind.

    from streams_dev.stack import up, down, status
    up(settings)                      # all of them, in parallel (the registry waits for PostgreSQL)
    stop_service(settings, "kafka")   # tests: simulate an outage...
    start_service(settings, "kafka")  # ...and the recovery

Kafka runs one node, or ``settings.kafka_brokers`` nodes (``kafka-1``, ``kafka-2``, ...):
``"kafka"`` names all of them, ``"kafka-2"`` one (``kill_service`` SIGKILLs one for
failover tests). ``down`` stops whatever Kafka layout the stack dir holds.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .kafka import Kafka, client_env
from .kms import Kms
from .postgres import Postgres
from .process import Service, StackError, file_lock, port_open, require_java, send_signal, wait_until
from .registry import Registry, find_java
from .sqs import Sqs

__all__ = [
    "SERVICES",
    "ServiceStatus",
    "StackError",
    "client_env",
    "down",
    "kafka_nodes",
    "kill_service",
    "running_brokers",
    "start_service",
    "status",
    "stop_service",
    "up",
]

SERVICES: dict[str, type[Service]] = {
    "kafka": Kafka,
    "postgres": Postgres,
    "sqs": Sqs,
    "registry": Registry,
    "kms": Kms,
}

log = logging.getLogger("streams_dev.stack")
Reporter = Callable[[str], None]


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    port: int
    detail: str


def kafka_nodes(settings, brokers: int | None = None) -> list[Kafka]:
    """The Kafka nodes of a stack of ``brokers`` (default ``settings.kafka_brokers``)."""
    n = settings.kafka_brokers if brokers is None else brokers
    return [Kafka(settings, node, n) for node in range(1, n + 1)]


def _layouts_on_disk(settings) -> list[int]:
    """Broker counts whose Kafka dirs exist in the stack dir (1: ``kafka``, n: ``kafka-1..n``)."""
    root = Path(settings.stack_dir).expanduser().resolve()
    found = [1] if (root / "kafka").is_dir() else []
    cluster = len([d for d in root.glob("kafka-[0-9]") if d.is_dir()])
    return found + ([cluster] if cluster > 1 else [])


def running_brokers(settings) -> int | None:
    """How many brokers the Kafka running in this stack dir has (None: none runs)."""
    for n in _layouts_on_disk(settings):
        if any(node.pid(adopt=False) is not None for node in kafka_nodes(settings, n)):
            return n
    return None


def _select(settings, services: Iterable[str] | None) -> list[Service]:
    names = list(SERVICES) if services is None else list(dict.fromkeys(services))
    nodes = {node.name: node for node in kafka_nodes(settings)}
    picked: list[Service] = []
    for name in names:
        if name == "kafka":
            picked += nodes.values()
        elif name in nodes:
            picked.append(nodes[name])
        elif name in SERVICES:
            picked.append(SERVICES[name](settings))
        else:
            choices = list(SERVICES) + (list(nodes) if settings.kafka_brokers > 1 else [])
            raise StackError(f"unknown service {name!r}: choose from {', '.join(choices)}")
    return picked


def _refuse_other_layout(settings) -> None:
    """Two Kafka layouts share the client port: switching needs a ``down`` first."""
    running = running_brokers(settings)
    if running is not None and running != settings.kafka_brokers:
        raise StackError(
            f"Kafka runs with {running} broker(s) in {settings.stack_dir}: run `streams stack down` first, "
            f"then `streams stack up --brokers {settings.kafka_brokers}`"
        )


def _lock(settings):
    """One stack operation at a time per stack dir (parallel test workers, two shells)."""
    return file_lock(Path(settings.stack_dir).expanduser().resolve() / ".lock")


def _say(report: Reporter | None, msg: str) -> None:
    log.info(msg)
    if report is not None:
        report(msg)


def _run_all(fn: Callable[[Service], None], svcs: list[Service]) -> None:
    """Run ``fn`` for every service in its own thread (JVM start-up dominates and
    overlaps well); raise one StackError naming every failure."""
    with ThreadPoolExecutor(max_workers=len(svcs), thread_name_prefix="stack") as pool:
        futures = [(svc, pool.submit(fn, svc)) for svc in svcs]
        errors = []
        for _svc, fut in futures:
            exc = fut.exception()
            if exc is None:
                continue
            if not isinstance(exc, StackError):
                raise exc
            errors.append(str(exc))
    if errors:
        raise StackError("; ".join(errors))


def up(settings, services: Iterable[str] | None = None, *, report: Reporter | None = None) -> None:
    """Start the selected services (default: all) and wait until each really serves.

    Already-running services are left alone but still probed, so a successful
    return always means "usable now". ``report`` receives one line per service
    (e.g. ``kafka started (pid 42) in 6.3s``).
    """
    svcs = _select(settings, services)
    with _lock(settings):
        if any(isinstance(svc, Kafka) for svc in svcs):
            _refuse_other_layout(settings)
        pids = {svc.name: svc.pid() for svc in svcs}
        # Cheap pre-flight checks first, so a taken port fails in milliseconds
        # instead of after a download or a JVM start.
        for svc in svcs:
            if pids[svc.name] is None:
                svc.check_ports()
        if any(pids[s.name] is None and isinstance(s, (Kafka, Sqs)) for s in svcs):
            require_java()
        if any(pids[s.name] is None and isinstance(s, Registry) for s in svcs):
            find_java()  # Java 21+, before a download or a JVM start

        def bring_up(svc: Service) -> None:
            began = time.monotonic()
            pid = pids[svc.name]
            if pid is not None:
                svc.wait_ready(pid)
                _say(report, f"{svc.name} already running (pid {pid}), ready in {time.monotonic() - began:.1f}s")
                return
            svc.stop()  # clear a stale pid file / orphan from a crashed run
            pid = svc.start()
            _say(report, f"{svc.name} started (pid {pid}) in {time.monotonic() - began:.1f}s: {svc.detail()}")

        _run_all(bring_up, svcs)
        fresh_kms = [s for s in svcs if isinstance(s, Kms) and pids[s.name] is None]
        if fresh_kms:  # a fresh moto has new keys: the dev rows sealed under the old ones never open again
            gone = fresh_kms[0].forget_lost_keys()
            if gone:
                _say(report, f"kms started empty: wiped {gone} dev rows sealed under its previous run's keys")


def down(settings, services: Iterable[str] | None = None, *, report: Reporter | None = None) -> None:
    """Stop the selected services (default: all): graceful first, SIGKILL after a deadline.

    Also removes stale pid files and kills processes started from this stack
    dir whose pid file was lost, so nothing is left listening afterwards.
    """
    svcs = _select(settings, services)
    if services is None:  # also a Kafka of another size started earlier from this stack dir
        names = {svc.name for svc in svcs}
        for n in _layouts_on_disk(settings):
            svcs += [node for node in kafka_nodes(settings, n) if node.name not in names]
    with _lock(settings):

        def bring_down(svc: Service) -> None:
            began = time.monotonic()
            pid = svc.stop()
            if pid is None:
                _say(report, f"{svc.name} was not running")
            else:
                _say(report, f"{svc.name} stopped (pid {pid}) in {time.monotonic() - began:.1f}s")

        _run_all(bring_down, svcs)


def status(settings) -> list[ServiceStatus]:
    """Which services run (pid file confirmed by the process's command line). Read-only and fast."""
    result = []
    for svc in _select(settings, None):
        pid = svc.pid(adopt=False)
        if pid is None:
            stale = svc.pid_file.exists()
            detail = f"stopped (stale pid file {svc.pid_file})" if stale else "stopped"
        elif not port_open(svc.port):
            detail = f"starting or unhealthy: port {svc.port} not accepting connections, log {svc.log_file}"
        else:
            detail = svc.detail()
        result.append(ServiceStatus(svc.name, pid is not None, pid, svc.port, detail))
    return result


def kill_service(settings, name: str, *, report: Reporter | None = None) -> int | None:
    """SIGKILL one service (e.g. ``"kafka-2"``, a broker dying without a controlled
    shutdown); returns its pid (None: it was not running). ``start_service`` restarts it."""
    (svc,) = _select(settings, [name])
    with _lock(settings):
        pid = svc.pid(adopt=False)
        if pid is None:
            return None
        send_signal(pid, signal.SIGKILL)
        if not wait_until(lambda: svc.pid(adopt=False) is None, 10.0):
            raise StackError(f"{name} (pid {pid}) survived SIGKILL: check `ps -p {pid}`")
    _say(report, f"{name} killed (pid {pid})")
    return pid


def start_service(settings, name: str, *, report: Reporter | None = None) -> None:
    """Start one service ("kafka", "kafka-2", "postgres", "sqs" or "registry") and wait until it serves."""
    up(settings, [name], report=report)


def stop_service(settings, name: str, *, report: Reporter | None = None) -> None:
    """Stop one service, e.g. to test how the pipeline rides out a broker or database outage."""
    down(settings, [name], report=report)

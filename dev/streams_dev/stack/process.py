"""Process plumbing shared by the stack services.

Services run as detached processes that outlive the CLI call that started them,
so every fact about them lives on disk: a pid file to find them again, a log
file to explain failures, and a "marker" (a path unique to this stack, e.g. the
config file) that must appear in the process's command line. The marker is what
makes a pid file trustworthy: after a reboot or container restart the recorded
pid may belong to an unrelated process, and we must never adopt or kill that.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil

from streams.errors import StreamsError

LOOPBACK = "127.0.0.1"
POLL = 0.1


class StackError(StreamsError):
    """A stack operation failed; the message is one actionable line."""


# --- pid files and liveness -------------------------------------------------


def read_pid(pid_file: Path) -> int | None:
    """The pid recorded in ``pid_file`` (first line, as postmaster.pid too), or None."""
    try:
        first = pid_file.read_text().split("\n", 1)[0].strip()
        return int(first)
    except (OSError, ValueError):
        return None


def matches(pid: int, marker: str) -> bool:
    """True if ``pid`` is a live (non-zombie) process whose command line mentions ``marker``.

    A zombie counts as dead: a child we spawned and that already exited stays a
    zombie until reaped, so we also reap it here when it is ours.
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            _reap(pid)
            return False
        return _mentions(proc.cmdline(), marker)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _mentions(cmdline: list[str], marker: str) -> bool:
    # Whole-argument match (or ``-Dkey=<marker>``): a substring test would let
    # /a/stack match /x/a/stack of another checkout.
    return any(arg == marker or arg.endswith("=" + marker) for arg in cmdline)


def find_by_marker(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions ``marker`` (pid file lost or stale)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        info = proc.info
        if info["status"] == psutil.STATUS_ZOMBIE or not info["cmdline"]:
            continue
        if info["pid"] != os.getpid() and _mentions(info["cmdline"], marker):
            found.append(info["pid"])
    return found


def running_pid(pid_file: Path, marker: str, *, adopt: bool = True) -> int | None:
    """The pid of the service identified by ``marker``, trusting the pid file only if it matches.

    With ``adopt`` a matching process found without a valid pid file gets its
    pid file rewritten, so later calls (and ``down``) find it directly.
    """
    pid = read_pid(pid_file)
    if pid is not None and matches(pid, marker):
        return pid
    others = find_by_marker(marker)
    if not others:
        return None
    # The oldest process is the parent (e.g. the postmaster, not a backend).
    pid = min(others, key=_create_time)
    if adopt and pid_file.name != "postmaster.pid":
        pid_file.write_text(f"{pid}\n")
    return pid


def _create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return float("inf")


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# --- spawn / terminate --------------------------------------------------------


def spawn(
    argv: Sequence[str], *, pid_file: Path, log_file: Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start ``argv`` detached (own session: Ctrl-C in the CLI must not kill it),
    stdout+stderr appended to ``log_file``, and record its pid."""
    with open(log_file, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    pid_file.write_text(f"{proc.pid}\n")
    return proc


def terminate(pid: int, marker: str, *, timeout: float = 30.0) -> bool:
    """SIGTERM (graceful shutdown flushes logs / offsets), then SIGKILL after ``timeout``.

    Returns True if SIGKILL was needed. Only signals the pid while its command
    line still matches ``marker``, so a recycled pid is never hit.
    """
    if not matches(pid, marker):
        return False
    send_signal(pid, signal.SIGTERM)
    if wait_until(lambda: not matches(pid, marker), timeout):
        return False
    send_signal(pid, signal.SIGKILL)
    if not wait_until(lambda: not matches(pid, marker), 10.0):
        raise StackError(f"process {pid} survived SIGKILL: check `ps -p {pid}`")
    return True


def send_signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        # Services are session leaders (start_new_session), so signal the whole
        # group: nothing they forked can be left behind.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


# --- waiting -------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = POLL) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_taken(port: int, host: str = LOOPBACK) -> bool:
    """True if ``host:port`` cannot be bound (someone listens there, or on 0.0.0.0).

    SO_REUSEADDR makes TIME_WAIT leftovers of our own previous run not count.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


# --- logs ----------------------------------------------------------------------

_NOISE = re.compile(r"^\s*(at |\.\.\. \d+ more|Caused by: \S+$|---|$)")
# ERROR/FATAL log levels, Java exception headers (java.lang.RuntimeException: ...), plain words.
_BAD = re.compile(r"\b(ERROR|FATAL|PANIC)\b|\w(Exception|Error)\b|\b(error|failed|refused|denied)\b")


def log_sizes(*logs: Path) -> dict[Path, int]:
    """Current size of each log, so a later failure report reads only this run's lines."""
    return {log: log.stat().st_size if log.exists() else 0 for log in logs}


def last_meaningful_line(*logs: Path, since: dict[Path, int] | None = None, max_bytes: int = 64_000) -> str:
    """The line that best explains a failure: the last error-looking line of the
    given logs (only what was written after ``since``), else the last non-blank
    one. Stack-trace frames are skipped."""
    fallback = ""
    for log in logs:
        try:
            with open(log, "rb") as fh:
                end = fh.seek(0, os.SEEK_END)
                start = (since or {}).get(log, 0)
                start = 0 if start > end else start  # rotated since
                fh.seek(max(start, end - max_bytes))
                lines = fh.read().decode(errors="replace").splitlines()
        except OSError:
            continue
        useful = [ln.strip() for ln in lines if not _NOISE.match(ln)]
        for line in reversed(useful):
            if _BAD.search(line):
                return line[:300]
        if useful and not fallback:
            fallback = useful[-1][:300]
    return fallback or "(log is empty)"


# --- locking -------------------------------------------------------------------

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock across processes (flock) and threads, so two concurrent
    ``up`` calls (e.g. parallel test workers) never start a service twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _thread_locks_guard:
        tlock = _thread_locks.setdefault(str(path), threading.Lock())
    with tlock, open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- jars from Maven Central ---------------------------------------------------

MARKER = ".complete"


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise StackError("java not found: install a JDK 17 (apt-get install openjdk-17-jre-headless)")
    return java


def ensure_jars(pom: Path, target: Path, log_file: Path, pattern: str = "*.jar") -> Path:
    """Materialise the pom's dependencies (files matching ``pattern``) in ``target`` once.

    A marker file holding the pom's hash is written only after a successful
    copy, so an interrupted download (or an edited pom) is redone, while the
    normal case costs one stat + one small read.
    """
    marker = target / MARKER
    digest = hashlib.sha256(pom.read_bytes()).hexdigest() if pom.exists() else None
    if marker.exists() and (digest is None or marker.read_text().strip() == digest):
        return target
    if digest is None:
        raise StackError(f"{pom} is missing and {target} has no complete jar set: run from a source checkout")
    # One maven at a time: concurrent runs can corrupt the shared ~/.m2 repository.
    with file_lock(target.parent / ".maven.lock"):
        if marker.exists() and marker.read_text().strip() == digest:
            return target  # another process finished it while we waited
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError("mvn not found: install Maven (apt-get install maven) to download the stack's jars")
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "wb") as log:
            rc = subprocess.run(
                [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={staging}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            ).returncode
        if rc != 0 or not any(staging.glob(pattern)):
            shutil.rmtree(staging, ignore_errors=True)
            raise StackError(f"maven download failed: {last_meaningful_line(log_file)} (see {log_file})")
        (staging / MARKER).write_text(digest + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


# --- the service lifecycle -----------------------------------------------------


class NotReady(Exception):
    """A readiness probe did not succeed yet (retried until the deadline)."""


class Service(abc.ABC):
    """One stack service: where its files live and how to start, probe and stop it.

    Subclasses fill in ``prepare`` (config, jars, storage), ``launch`` (spawn)
    and ``probe`` (one real round trip); the loop, deadlines and error
    messages are shared so every service fails the same, explainable way.
    """

    name = ""
    ready_timeout = 60.0
    stop_timeout = 30.0
    owns_pid_file = True  # False when the server writes (and cleans up) its own

    def __init__(self, settings) -> None:
        self.settings = settings
        self.stack_dir = Path(settings.stack_dir).expanduser().resolve()
        self.dir = self.stack_dir / self.name
        self.cache_dir = Path(settings.stack_cache_dir).expanduser().resolve()

    # -- identity --------------------------------------------------------------
    @property
    def pid_file(self) -> Path:
        return self.dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / f"{self.name}.log"

    @property
    def logs(self) -> tuple[Path, ...]:
        """Every file that may hold the reason for a failed start, most specific first."""
        return (self.log_file,)

    @property
    @abc.abstractmethod
    def marker(self) -> str:
        """Text in the service's command line that proves a pid is ours."""

    @property
    @abc.abstractmethod
    def port(self) -> int:
        """The port clients use."""

    @abc.abstractmethod
    def ports(self) -> list[tuple[int, str]]:
        """(port, env var that moves it) for every port the service binds."""

    def pid(self, *, adopt: bool = True) -> int | None:
        return running_pid(self.pid_file, self.marker, adopt=adopt)

    def detail(self) -> str:
        return f"{LOOPBACK}:{self.port}, log {self.log_file}"

    # -- lifecycle -------------------------------------------------------------
    def check_ports(self) -> None:
        for port, env in self.ports():
            if port_taken(port):
                raise StackError(f"port {port} is taken by another process: set {env}")

    def prepare(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Everything slow but idempotent that must precede launch (jars, config, storage)."""

    @abc.abstractmethod
    def launch(self) -> subprocess.Popen | None:
        """Start the process (detached); return it if we spawned it directly."""

    @abc.abstractmethod
    def probe(self, timeout: float) -> None:
        """One real round trip through the service; raise NotReady if it is not serving yet."""

    def start(self) -> int:
        """Start the service (it must not be running) and return its pid once it serves."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._since = log_sizes(*self.logs)
        self.prepare()
        proc = self.launch()
        pid = self.pid()
        if pid is None and proc is not None and proc.poll() is None:
            # Our own child, alive, whose command line did not read back yet (seen while
            # several JVMs start at once): the child handle is the authority.
            pid = proc.pid
        try:
            if pid is None:
                raise StackError(f"{self.name} exited during startup: {self.last_log_line()} (see {self.log_file})")
            self.wait_ready(pid, proc)
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()  # a half-started service must not linger (nor its pid file)
            raise
        return pid

    def last_log_line(self) -> str:
        return last_meaningful_line(*self.logs, since=getattr(self, "_since", None))

    def wait_ready(self, pid: int, proc: subprocess.Popen | None = None) -> None:
        """Probe until the service really serves; fail fast if its process dies."""
        start = time.monotonic()
        deadline = start + self.ready_timeout
        last = "no probe ran"
        while True:
            exited = proc.poll() if proc is not None else None
            if exited is not None or (proc is None and not matches(pid, self.marker)):
                code = f" (exit code {exited})" if exited is not None else ""
                raise StackError(
                    f"{self.name} exited during startup{code}: {self.last_log_line()} (see {self.log_file})"
                )
            remaining = deadline - time.monotonic()
            try:
                self.probe(max(1.0, min(remaining, 10.0)))
                return
            except NotReady as exc:
                last = str(exc) or type(exc).__name__
            if time.monotonic() >= deadline:
                # An instance started earlier with other ports/settings never answers here.
                hint = "; if its settings changed, run `streams stack down` first" if proc is None else ""
                raise StackError(
                    f"{self.name} (pid {pid}) not ready after {self.ready_timeout:.0f}s: "
                    f"{last} (see {self.log_file}{hint})"
                )
            time.sleep(0.2)

    def stop(self) -> int | None:
        """Stop the service and anything else started from this stack dir; return the pid stopped."""
        pid = self.pid(adopt=False)
        if pid is not None:
            self.shutdown(pid)
        for other in find_by_marker(self.marker):  # pid file lost or a duplicate
            terminate(other, self.marker, timeout=self.stop_timeout)
        if self.owns_pid_file:
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()
        return pid

    def shutdown(self, pid: int) -> None:
        terminate(pid, self.marker, timeout=self.stop_timeout)

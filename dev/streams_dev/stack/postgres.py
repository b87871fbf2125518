"""PostgreSQL 16 from the ``pgserver`` wheel: real server binaries, no system install.

PostgreSQL refuses to run as root, so under root (containers, CI) initdb and
pg_ctl run as a dedicated system user, prepared exactly the way
``pgserver.postgres_server`` does it. The postmaster's own ``postmaster.pid``
is the pid file; ``pg_ctl -w`` already waits for "ready", and a ``SELECT 1``
through asyncpg proves the TCP listener the app uses.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import stat
import subprocess
import warnings
from pathlib import Path
from urllib.parse import unquote, urlsplit

import psutil

from .process import (
    LOOPBACK,
    NotReady,
    Service,
    StackError,
    matches,
    read_pid,
    terminate,
    wait_until,
)

SYSTEM_USER = "pgserver"  # the same user pgserver itself creates
_bin_prepared = False


def _pgserver():
    """Import pgserver lazily (it is big) and without its XDG_RUNTIME_DIR warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver import _commands, utils
    return _commands, utils


def _gid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


class Postgres(Service):
    name = "postgres"
    owns_pid_file = False  # postmaster.pid is postgres's own

    @property
    def port(self) -> int:
        return self.settings.pg_port

    def ports(self) -> list[tuple[int, str]]:
        return [(self.settings.pg_port, "STREAMS_PG_PORT")]

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "postmaster.pid"

    @property
    def pg_ctl_out(self) -> Path:
        return self.dir / "pg_ctl.out"

    @property
    def logs(self) -> tuple[Path, ...]:
        return (self.log_file, self.pg_ctl_out)

    @property
    def marker(self) -> str:
        return str(self.data_dir)  # the postmaster runs as `postgres -D <data_dir> ...`

    @property
    def database(self) -> str:
        path = urlsplit(self.settings.pg_dsn.get_secret_value()).path.lstrip("/")
        return unquote(path) or "streams"

    def detail(self) -> str:
        return f"{LOOPBACK}:{self.port}/{self.database}, log {self.log_file}"

    # -- start -----------------------------------------------------------------
    def _bin(self, name: str) -> str:
        commands, _ = _pgserver()
        return str(commands.POSTGRES_BIN_PATH / name)

    def _system_user(self) -> str | None:
        """None when we may run postgres ourselves; else the user to run it as."""
        if os.geteuid() != 0:
            return None
        _, utils = _pgserver()
        try:
            utils.ensure_user_exists(SYSTEM_USER)
        except (subprocess.CalledProcessError, OSError) as exc:
            raise StackError(
                f"cannot create system user {SYSTEM_USER!r} to run postgres as (root is refused): "
                f"{exc}; run `useradd {SYSTEM_USER}` or use a non-root account"
            ) from None
        return SYSTEM_USER

    def _grant(self, user: str) -> None:
        """What pgserver does before initdb under root: let ``user`` reach the data
        and the binaries, and own the service dir (data, log)."""
        global _bin_prepared
        import pwd

        commands, utils = _pgserver()
        utils.ensure_prefix_permissions(self.dir)
        if not _bin_prepared:
            bin_path = commands.POSTGRES_BIN_PATH
            utils.ensure_prefix_permissions(bin_path)
            read_perm = stat.S_IRGRP | stat.S_IROTH
            execute_perm = stat.S_IXGRP | stat.S_IXOTH
            utils.ensure_folder_permissions(bin_path, execute_perm | read_perm)
            utils.ensure_folder_permissions(bin_path.parent / "lib", read_perm)
            _bin_prepared = True
        entry = pwd.getpwnam(user)
        for path in (self.dir, self.data_dir, self.log_file):
            if path.exists() and path.stat().st_uid != entry.pw_uid:
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def prepare(self) -> None:
        self._user = self._system_user()
        if self._user is not None:
            self._grant(self._user)
        self._clear_stale_locks()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "--auth=trust",
                    "-U",
                    "postgres",
                    "--encoding=utf8",
                    "--locale=C",
                    "--no-instructions",
                ],
                what="initdb",
                timeout=120,
            )

    def _clear_stale_locks(self) -> None:
        """Deal with the lock files of a postmaster that died without cleaning up.

        PostgreSQL removes them itself when their pid is gone, and must: they
        guard against orphaned backends still attached to shared memory. But if
        the pid is taken again (reboot, container restart, an unreaped zombie),
        postgres refuses to start forever; only then do we remove them.
        """
        pid = read_pid(self.pid_file)
        if pid is None or matches(pid, self.marker):
            return
        if wait_until(lambda: not psutil.pid_exists(pid), 5.0):
            return
        for lock in (self.pid_file, *self.data_dir.glob(".s.PGSQL.*.lock")):
            lock.unlink(missing_ok=True)

    def _run(self, argv: list[str], *, what: str, timeout: float) -> None:
        out_file = self.pg_ctl_out
        # Drop root's group too, not just its uid (pgserver only switches the user).
        ids = {} if self._user is None else {"user": self._user, "group": _gid(self._user), "extra_groups": []}
        with open(out_file, "ab") as out:
            try:
                rc = subprocess.run(
                    argv,
                    cwd=self.dir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    timeout=timeout,
                    **ids,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = None
        if rc != 0:
            why = "timed out" if rc is None else "failed"
            raise StackError(f"postgres {what} {why}: {self.last_log_line()} (see {self.log_file})")

    def launch(self) -> None:
        sock = self.data_dir
        # Unix socket paths are limited to ~107 bytes; TCP is what we use anyway.
        sock_opt = shlex.quote(str(sock)) if len(str(sock)) < 90 else "''"
        opts = f"-h {LOOPBACK} -p {self.port} -k {sock_opt}"
        self._run(
            [
                self._bin("pg_ctl"),
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                str(int(self.ready_timeout)),
                "-o",
                opts,
                "-l",
                str(self.log_file),
                "start",
            ],
            what="start",
            timeout=self.ready_timeout + 10,
        )
        return None

    # -- readiness -------------------------------------------------------------
    def probe(self, timeout: float) -> None:
        """``SELECT 1`` over TCP, then create the app database if it is missing."""
        try:
            asyncio.run(self._probe(timeout))
        except (TimeoutError, OSError) as exc:
            raise NotReady(f"connect failed: {exc}") from None
        except Exception as exc:  # asyncpg's "starting up" / "shutting down" errors
            if type(exc).__module__.startswith("asyncpg"):
                raise NotReady(f"{type(exc).__name__}: {exc}") from None
            raise

    async def _probe(self, timeout: float) -> None:
        import asyncpg

        conn = await asyncpg.connect(
            host=LOOPBACK, port=self.port, user="postgres", database="postgres", timeout=timeout
        )
        try:
            await conn.fetchval("SELECT 1")
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", self.database):
                ident = '"' + self.database.replace('"', '""') + '"'
                await conn.execute(f"CREATE DATABASE {ident}")
        finally:
            await conn.close(timeout=timeout)

    # -- stop ------------------------------------------------------------------
    def shutdown(self, pid: int) -> None:
        """``pg_ctl stop -m fast``: rolls back open transactions, checkpoints, exits.
        If pg_ctl cannot do it (damaged pid file, wedged server), signal it directly."""
        self._user = self._system_user()
        try:
            self._run(
                [
                    self._bin("pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(int(self.stop_timeout)),
                    "stop",
                ],
                what="stop",
                timeout=self.stop_timeout + 10,
            )
        except StackError:
            pass
        terminate(pid, self.marker, timeout=10.0)

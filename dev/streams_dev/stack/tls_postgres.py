"""A PostgreSQL with ``ssl=on`` from the system's packages (Debian ``postgresql``), for TLS tests.

``pgserver`` (the local stack's PostgreSQL) is built without OpenSSL, so a server that
speaks TLS comes from the distribution: ``apt-get install postgresql``. It runs in a
folder of its own on a free port, accepts only ``hostssl`` connections with a password
(SCRAM), and presents a certificate issued by a local CA (``streams_dev.tls``). Under
root it runs as the package's ``postgres`` user (PostgreSQL refuses root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from streams_dev.tls import Issued

from .process import LOOPBACK, StackError, last_meaningful_line


def system_bindir() -> Path:
    """The newest installed server's bin folder (``/usr/lib/postgresql/<major>/bin``)."""
    found = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if (Path(p) / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not found:
        raise StackError("no system PostgreSQL server: apt-get install postgresql (pgserver has no TLS)")
    return found[-1]


class TlsPostgres:
    """Start with ``start()``, stop with ``stop()``; ``dsn()`` for clients that verify the server."""

    def __init__(self, directory: Path, port: int, server: Issued, password: str) -> None:
        self.dir = Path(directory)
        self.port = port
        self.server = server
        self.password = password
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.bindir = system_bindir()
        self.user = "postgres" if os.geteuid() == 0 else None

    def _run(self, *argv: str, timeout: float = 120) -> None:
        ids = {}
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            ids = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        result = subprocess.run(
            list(argv), cwd=self.dir, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, **ids
        )
        if result.returncode != 0:
            why = (result.stderr or result.stdout).strip().splitlines()[-1:] or [last_meaningful_line(self.log)]
            raise StackError(f"{Path(argv[0]).name} failed: {why[0]} (see {self.log})")

    def _own(self, path: Path, mode: int) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(mode)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._own(self.dir, 0o700)
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._own(pwfile, 0o600)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=utf8",
            "--locale=C",
            "--no-instructions",
        )
        pwfile.unlink()
        for source, name in ((self.server.cert, "server.crt"), (self.server.key, "server.key")):
            target = self.data / name
            shutil.copyfile(source, target)
            self._own(target, 0o600)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nlisten_addresses = '{LOOPBACK}'\nport = {self.port}\nunix_socket_directories = '{self.dir}'\n"
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                "ssl_min_protocol_version = 'TLSv1.2'\n"
            )
        (self.data / "pg_hba.conf").write_text(
            "# TLS only: a plaintext TCP connection is rejected.\n"
            "local   all all                scram-sha-256\n"
            f"hostssl all all {LOOPBACK}/32  scram-sha-256\n"
            f"host    all all {LOOPBACK}/32  reject\n"
        )
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def dsn(
        self,
        database: str = "postgres",
        user: str = "postgres",
        password: str | None = None,
        rootcert: Path | None = None,
        sslmode: str = "verify-full",
    ) -> str:
        secret = self.password if password is None else password
        query = f"sslmode={sslmode}" + (f"&sslrootcert={rootcert}" if rootcert else "")
        return f"postgresql://{user}:{secret}@{LOOPBACK}:{self.port}/{database}?{query}"

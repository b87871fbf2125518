"""Pinned command-line tools the tests run, fetched once into ``settings.stack_cache_dir``.

- ``promtool`` and ``prometheus``: Debian's ``prometheus`` package (static Go binaries),
  downloaded with ``apt-get download`` (or, off Debian bookworm, from the Debian pool),
  checked against a pinned SHA-256 and unpacked with ``dpkg -x``. Nothing is installed
  system-wide and no service is started.
- ``actionlint``: built from its Go module with ``go install`` into a cached GOBIN.

Each lands in a versioned directory with a marker written last, like the Kafka jars
(``stack/process.py``: ``ensure_jars``), so an interrupted fetch is redone and the normal
case costs one stat. ``python -m streams_dev.tools`` (``make tools``) fetches all of them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import quote

from streams.settings import Settings
from streams_dev.stack.process import MARKER, StackError, file_lock, last_meaningful_line

# When Debian supersedes this version (a bookworm point release), the pool drops it: pin the
# new one (`apt-cache policy prometheus`) and its SHA-256 (`sha256sum` of the .deb).
PROMETHEUS_DEB = "prometheus"
PROMETHEUS_VERSION = "2.42.0+ds-5+deb12u1"  # Debian bookworm
PROMETHEUS_SHA256 = {"amd64": "81d59a24fce84f7fbe97a45a4f2914b6a5881b5cd1db2a6a0e129e515e1a5f55"}
DEBIAN_POOL = "https://deb.debian.org/debian/pool/main/p/prometheus"

ACTIONLINT_MODULE = "github.com/rhysd/actionlint/cmd/actionlint"
ACTIONLINT_VERSION = "1.7.12"  # needs Go 1.25 or newer to build


def cache_dir(settings: Settings | None = None) -> Path:
    return Path((settings or Settings()).stack_cache_dir).expanduser().resolve()


def _complete(target: Path, version: str) -> bool:
    marker = target / MARKER
    return marker.exists() and marker.read_text().strip() == version


def _install_once(target: Path, version: str, build) -> Path:
    """Run ``build(staging_dir)`` once per version (locked across processes), then publish it."""
    if _complete(target, version):
        return target
    with file_lock(target.parent / f".{target.name}.lock"):
        if _complete(target, version):
            return target  # another process finished it while we waited
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            build(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        (staging / MARKER).write_text(version + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


# --- promtool and prometheus ---------------------------------------------------------------


def _deb_arch() -> str:
    dpkg = shutil.which("dpkg")
    arch = subprocess.run([dpkg, "--print-architecture"], capture_output=True, text=True).stdout.strip() if dpkg else ""
    if arch not in PROMETHEUS_SHA256:
        raise StackError(
            f"no pinned prometheus package for architecture {arch or 'unknown (no dpkg)'}: "
            f"add its SHA-256 to PROMETHEUS_SHA256 in {__file__}"
        )
    return arch


def _download_deb(into: Path, arch: str) -> Path:
    """The pinned .deb: through apt (the machine's mirrors) if it knows the version, else the Debian pool."""
    if shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "download", "-q", f"{PROMETHEUS_DEB}={PROMETHEUS_VERSION}"],
            cwd=into,
            capture_output=True,
        )
        found = list(into.glob(f"{PROMETHEUS_DEB}_*_{arch}.deb"))
        if found:
            return found[0]
    deb = into / f"{PROMETHEUS_DEB}_{PROMETHEUS_VERSION}_{arch}.deb"
    url = f"{DEBIAN_POOL}/{quote(deb.name)}"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(deb, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as exc:
        raise StackError(f"cannot download {url}: {exc}") from None
    return deb


def prometheus_home(settings: Settings | None = None) -> Path:
    """The unpacked package (``usr/bin/prometheus``, ``usr/bin/promtool``), fetched on first use."""
    arch = _deb_arch()
    target = cache_dir(settings) / f"prometheus-{PROMETHEUS_VERSION}"

    def build(staging: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="prometheus-deb-") as tmp:
            os.chmod(tmp, 0o755)  # apt's _apt user writes the download here
            deb = _download_deb(Path(tmp), arch)
            digest = hashlib.sha256(deb.read_bytes()).hexdigest()
            if digest != PROMETHEUS_SHA256[arch]:
                raise StackError(f"{deb.name} has SHA-256 {digest}, expected {PROMETHEUS_SHA256[arch]}: not using it")
            result = subprocess.run(["dpkg", "-x", str(deb), str(staging)], capture_output=True, text=True)
            if result.returncode != 0:
                raise StackError(f"dpkg -x {deb.name} failed: {result.stderr.strip()[-300:]}")

    return _install_once(target, PROMETHEUS_VERSION, build)


def promtool(settings: Settings | None = None) -> Path:
    return prometheus_home(settings) / "usr" / "bin" / "promtool"


def prometheus(settings: Settings | None = None) -> Path:
    return prometheus_home(settings) / "usr" / "bin" / "prometheus"


# --- actionlint ----------------------------------------------------------------------------


def _go() -> str:
    go = shutil.which("go") or shutil.which("go", path="/usr/local/go/bin")  # the official tarball's place
    if go is None:
        raise StackError("go not found: install Go 1.25 or newer (https://go.dev/dl) to build actionlint")
    return go


def actionlint(settings: Settings | None = None) -> Path:
    """``actionlint`` built from source at the pinned version (Go's module and build caches apply)."""
    target = cache_dir(settings) / f"actionlint-{ACTIONLINT_VERSION}"

    def build(staging: Path) -> None:
        log = staging / "go-install.log"
        with open(log, "wb") as out:
            rc = subprocess.run(
                [_go(), "install", f"{ACTIONLINT_MODULE}@v{ACTIONLINT_VERSION}"],
                env={**os.environ, "GOBIN": str(staging)},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            ).returncode
        if rc != 0 or not (staging / "actionlint").exists():
            raise StackError(f"go install actionlint failed: {last_meaningful_line(log)}")

    return _install_once(target, ACTIONLINT_VERSION, build) / "actionlint"


def main() -> None:
    """Fetch every tool (CI does it up front, so a missing one fails early, in one line)."""
    try:
        for path in (promtool(), prometheus(), actionlint()):
            print(path)
    except StackError as exc:
        sys.exit(f"tools: {exc}")


if __name__ == "__main__":
    main()

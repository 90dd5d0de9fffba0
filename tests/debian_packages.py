"""Debian packages that end-to-end tests need (prometheus, redis-server), installed on first use when missing.

Tests run as root in the test image. A package whose postinst starts its service (both of these do) must not
leave a daemon on its default port behind: service starts are forbidden during the install, and whatever runs
the freshly installed binary afterwards is killed.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# invoke-rc.d asks this script whether a maintainer script may start a service; exit status 101 means no.
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
INSTALL_LOCK = Path(tempfile.gettempdir()) / "embed-gateway-apt-install.lock"


def ensure_installed(package: str, binary: str) -> str:
    """The path of `binary`, installing Debian's `package` first when it is missing."""
    if os.access(binary, os.X_OK):
        return binary
    if os.geteuid() != 0:
        raise RuntimeError(f"{binary} is missing and only root can install it: run `apt-get install {package}` as root")
    # Test processes started side by side may all get here; apt lets only one of them install.
    with open(INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.access(binary, os.X_OK):
            _install(package, binary)
    return binary


def _install(package: str, binary: str) -> None:
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    with service_starts_forbidden():
        result = _apt(install)
        # The package lists at hand are tried first: an update takes a while and is needed only when they are
        # missing or stale (the install then cannot find or download the package).
        if result.returncode != 0:
            _apt(["apt-get", "update"])
            result = _apt(install)
    _end_daemons_of_install(binary)
    if result.returncode != 0 or not os.access(binary, os.X_OK):
        raise RuntimeError(f"`{' '.join(install)}` failed with status {result.returncode}:\n{result.stdout[-4000:]}")


def _apt(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)


@contextmanager
def service_starts_forbidden() -> Iterator[None]:
    """Forbids maintainer scripts to start services, whatever policy was in place, and puts that policy back."""
    saved = POLICY_RC_D.read_bytes() if POLICY_RC_D.exists() else None
    mode = POLICY_RC_D.stat().st_mode if saved is not None else None
    POLICY_RC_D.write_text("#!/bin/sh\n# Written by tests/debian_packages.py while it installs a package.\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        if saved is None:
            POLICY_RC_D.unlink()
        else:
            POLICY_RC_D.write_bytes(saved)
            POLICY_RC_D.chmod(mode)


def _end_daemons_of_install(binary: str) -> None:
    """Kill any process running the binary: it did not exist before the install, so the install started it."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "exe") == binary:
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            continue  # gone meanwhile, or not ours to read

"""A throwaway PostgreSQL server for tests: initdb into a temporary directory, postgres on a free port, stopped by PID.

Tests run as root and postgres refuses to, so as root the server runs as the unprivileged `postgres` user that the
Debian package creates. Nothing outlives stop(): the postmaster and every process it forked are ended by PID.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

DEBIAN_PACKAGE = "postgresql"
SERVER_USER = "postgres"
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10
REAP_TIMEOUT_S = 3


def _installed_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin that has initdb."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    return found[-1].parent if found else None


def installed_bin() -> Path:
    """The directory of initdb and postgres; `bin/setup --checks` installs them, a test never does."""
    found = _installed_bin()
    if found is None:
        raise RuntimeError(
            f"PostgreSQL is missing (no /usr/lib/postgresql/*/bin/initdb): `bin/setup --checks` installs Debian's {DEBIAN_PACKAGE!r} (as root)"
        )
    return found


def _server_account() -> pwd.struct_passwd | None:
    """Who the server runs as: the postgres system user when we are root (created if missing), else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        command = ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER]
        subprocess.run(command, check=True)
        return pwd.getpwnam(SERVER_USER)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A running server with one database, `url`; use as a context manager or call stop()."""

    def __init__(self, dbname: str = "test") -> None:
        self.bin = installed_bin()
        self._account = _server_account()
        self.root = Path(tempfile.mkdtemp(prefix="pg-test-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "postgres.log"
        self.process: subprocess.Popen | None = None
        self.port = 0
        # Even if the test run ends without calling stop(), the server does not outlive it.
        atexit.register(self.stop)
        try:
            self.sockets.mkdir()
            if self._account is not None:
                for path in (self.root, self.sockets):
                    os.chown(path, self._account.pw_uid, self._account.pw_gid)
            self._run_as_server(
                [self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"]
            )
            self._start_on_free_port()
            self.url = self.create_database(dbname)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, dbname: str) -> str:
        """A new empty database; its URL."""
        with psycopg.connect(self.url_for("postgres"), autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        return self.url_for(dbname)

    def create_schema(self, schema: str) -> str:
        """A new empty schema in the server's database; a URL whose connections use it (a hundred times cheaper than a
        new database, for a fresh one per test)."""
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        return f"{self.url}?options=-csearch_path%3D{schema}"

    def _as_server(self) -> dict:
        if self._account is None:
            return {}
        return {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}

    def _run_as_server(self, command: list) -> None:
        done = subprocess.run(command, cwd=self.root, capture_output=True, text=True, **self._as_server())
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}")

    def _start_on_free_port(self, attempts: int = 3) -> None:
        # Another process can take the port between free_port() and the bind; then try another one.
        for attempt in range(attempts):
            self.port = free_port()
            try:
                self.start()
                return
            except RuntimeError:
                if attempt == attempts - 1 or "already in use" not in self.log_tail():
                    raise

    def start(self) -> None:
        """Starts the server on self.port and waits until it accepts connections."""
        command = [self.bin / "postgres", "-D", self.data, "-p", str(self.port), "-k", self.sockets]
        # Throwaway data, so no fsync. synchronous_commit stays on: a commit is then in the WAL (in the page cache) before
        # it is acknowledged, and survives kill(), which tests rely on. Dynamic shared memory in files of the data
        # directory rather than /dev/shm: a server killed with SIGKILL cannot remove its segments, and the data
        # directory goes with stop().
        settings = ("listen_addresses=127.0.0.1", "fsync=off", "full_page_writes=off", "dynamic_shared_memory_type=mmap")
        for setting in settings:
            command += ["-c", setting]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, **self._as_server())
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                psycopg.connect(self.url_for("postgres"), connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._end(signal.SIGKILL)
                raise RuntimeError(f"postgres did not start on port {self.port}; log tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def _end(self, sig: signal.Signals) -> None:
        """Signals the postmaster, waits for it, then kills whatever it forked that is still there."""
        if self.process is None:
            return
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        # Backends exit by themselves once the postmaster is gone, but only eventually; a restart needs them gone now.
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        # Orphaned by the postmaster's death, they are init's to reap (here within about a second); waiting for that
        # means no `postgres <defunct>` is left behind. Bounded: an init that never reaps must not hang the tests.
        psutil.wait_procs(children, timeout=REAP_TIMEOUT_S)
        self.process = None

    def kill(self) -> None:
        """Simulates a crash: SIGKILL to the server and all its processes. The data directory stays for restart()."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Stops the server if it runs (fast shutdown) and starts it again on the same port with the same data."""
        self._end(signal.SIGINT)
        self.start()

    def stop(self) -> None:
        """Stops the server and removes its directory. SIGINT rather than SIGTERM: SIGTERM is PostgreSQL's "smart"
        shutdown, which waits for every client to disconnect; SIGINT ("fast") ends their sessions first."""
        self._end(signal.SIGINT)
        shutil.rmtree(self.root, ignore_errors=True)
        atexit.unregister(self.stop)

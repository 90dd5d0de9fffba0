"""Shared fixtures, and the guard of the test tiers.

Every test that starts a real server (the gateway, Triton, PostgreSQL, Redis, Prometheus, perf_analyzer), a bench run,
a bin/ script or a git clone carries the `e2e` marker, and so does a whole model export (tens of seconds, no server);
`pytest -m "not e2e"` is the fast tier, in process. Two checks keep a forgotten marker from starting servers there:

- at collection, a test not marked e2e that uses a fixture tagged with harness.servers.starts_servers (such as
  `service` below) stops the run before any test starts;
- while a test not marked e2e runs (its fixtures' set-up and teardown included), launching such a program raises
  ServerOutsideE2E, through an audit hook on subprocess.Popen that sees every launch, however it is made.

`slow` (the soak, the bench smoke runs) is a subset of e2e, which is checked too.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from harness.servers import MODEL_REPOSITORY, ROOT, start_service, starts_servers

# Programs that are servers, or load generators against one, wherever they are installed.
SERVER_PROGRAMS = frozenset({"tritonserver", "perf_analyzer", "initdb", "postgres", "pg_ctl", "redis-server", "prometheus"})
# `python -m gateway ...` serves unless it runs one of the admin commands or only prints its help.
GATEWAY_ADMIN_COMMANDS = frozenset({"users", "tokens"})
GATEWAY_HELP = frozenset({"-h", "--help"})


class ServerOutsideE2E(RuntimeError):
    """A test not marked e2e started a server."""


def server_launch(args: list, cwd) -> str | None:
    """What launching `args` (a Popen argv) starts that only an e2e test may, in words; None for anything else."""
    argv = [os.fsdecode(arg) for arg in args]
    if len(argv) >= 3 and Path(argv[0]).name in {"sh", "bash"} and argv[1] == "-c":
        try:
            argv = shlex.split(argv[2])
        except ValueError:
            return None
    if not argv:
        return None
    program = Path(argv[0])
    if program.name in SERVER_PROGRAMS:
        return program.name
    script = Path(os.fsdecode(cwd or os.getcwd())) / program
    if Path(os.path.abspath(script)).parent == ROOT / "bin" or script.resolve().parent == (ROOT / "bin").resolve():
        return f"bin/{program.name}"
    if program.name == "git" and "clone" in argv[1:]:
        return "git clone"
    if "-m" in argv[1:-1]:
        at = argv.index("-m", 1)
        module, rest = argv[at + 1], argv[at + 2 :]
        if module == "gateway" and not (rest and rest[0] in GATEWAY_ADMIN_COMMANDS) and not GATEWAY_HELP & set(rest):
            return "the gateway (python -m gateway)"
        if module.split(".")[0] == "bench":
            return f"a bench run (python -m {module})"
        if module == "deploy.images.run_triton":
            return "Triton (python -m deploy.images.run_triton)"
        if module.split(".")[0] == "tests":
            return f"a test server (python -m {module})"
    return None


# The test being run (its set-up, call and teardown), for the audit hook; empty between tests.
_running: list[pytest.Item] = []


def _refuse_servers_outside_e2e(event: str, args: tuple) -> None:
    if event != "subprocess.Popen" or not _running:
        return
    item = _running[-1]
    if item.get_closest_marker("e2e") is not None:
        return
    _, argv, cwd, _ = args
    started = server_launch(argv, cwd)
    if started is not None:
        raise ServerOutsideE2E(
            f"{item.nodeid} starts {started} but is not marked e2e: add @pytest.mark.e2e to the test "
            "(or pytestmark = pytest.mark.e2e to its module), so that `pytest -m 'not e2e'` stays in process"
        )


def pytest_configure(config: pytest.Config) -> None:
    # An audit hook cannot be removed; outside a test it lets everything through.
    sys.addaudithook(_refuse_servers_outside_e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stops the run, before any test starts, if a test not marked e2e uses a fixture that starts servers, or a slow
    test is not marked e2e. Runs before `-m` deselects, so every tier checks every collected test."""
    problems = []
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            continue
        if item.get_closest_marker("slow") is not None:
            problems.append(f"{item.nodeid} is marked slow but not e2e")
        definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        starting = sorted(
            name
            for name in getattr(item, "fixturenames", ())
            if any(getattr(d.func, "starts_servers", False) for d in definitions.get(name, ()))
        )
        if starting:
            problems.append(f"{item.nodeid} is not marked e2e but uses fixtures that start servers: {', '.join(starting)}")
    if problems:
        raise pytest.UsageError(
            "missing e2e markers (add @pytest.mark.e2e to the test, or pytestmark = pytest.mark.e2e to its module):\n  "
            + "\n  ".join(problems)
        )


@pytest.fixture(scope="session")
def manifest() -> dict:
    (path,) = MODEL_REPOSITORY.glob("*/embedding_manifest.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def model_name(manifest) -> str:
    return manifest["name"]


@pytest.fixture(scope="session")
def tokenizer(manifest):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(MODEL_REPOSITORY / manifest["tokenizer"]))


@pytest.fixture(scope="session")
@starts_servers
def service(tmp_path_factory):
    """One real Triton and gateway for the whole test session."""
    running = start_service(tmp_path_factory.mktemp("service"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def models():
    """The exported repository's models, for the in-process HTTP harness (tests.http_harness)."""
    from gateway.core.catalog import Catalog

    return Catalog.from_repository(MODEL_REPOSITORY)


@pytest.fixture
def gateway(models):
    """The real HTTP protocol and app in-process over a fake Triton (tests.http_harness)."""
    from tests.http_harness import Gateway

    return Gateway(models)

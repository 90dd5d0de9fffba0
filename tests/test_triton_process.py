"""Start-up checks of the Triton launcher that need no server, and its watch over the stubs' exits."""

import signal
import subprocess
import sys
import time

import psutil
import pytest

from gateway.triton.process import ExitWatch, TritonPorts, TritonProcess, TritonStartError
from harness.servers import ROOT


def test_a_run_directory_with_an_equals_sign_is_refused_before_triton_starts(tmp_path):
    run_dir = tmp_path / "variant=1"
    triton = TritonProcess(ROOT / "model_repository", [], TritonPorts(1, 2, 3), run_dir, run_dir / "triton.log")
    with pytest.raises(TritonStartError, match="must not contain '='"):
        triton.start(timeout_s=1)
    assert triton.process is None


@pytest.mark.parametrize("key", ["short", "sixteen:chars=ab,cd", "with a space in it!"])
def test_an_admin_key_that_triton_cannot_take_is_refused_before_triton_starts(tmp_path, key):
    triton = TritonProcess(ROOT / "model_repository", [], TritonPorts(1, 2, 3), tmp_path, tmp_path / "triton.log", admin_key=key)
    with pytest.raises(TritonStartError, match="admin key must be at least 16 characters"):
        triton.start(timeout_s=1)
    assert triton.process is None
    assert not triton.admin_key_file.exists()


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_the_exit_watch_names_a_process_once_it_exits_even_unreaped():
    first, second = _sleeper(), _sleeper()
    watch = ExitWatch([psutil.Process(first.pid), psutil.Process(second.pid)])
    try:
        assert watch.exited() == []
        second.send_signal(signal.SIGKILL)
        # Not reaped: a stub Triton has not waited for yet is a zombie, and lost all the same.
        deadline = time.monotonic() + 10
        while psutil.Process(second.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watch.exited() == [second.pid]
        second.wait()
        assert watch.exited() == [second.pid]
    finally:
        watch.close()
        for process in (first, second):
            process.kill()
            process.wait()


def test_the_exit_watch_names_a_process_that_was_a_zombie_when_watched_once():
    zombie = _sleeper()
    process = psutil.Process(zombie.pid)
    zombie.kill()
    deadline = time.monotonic() + 10
    while process.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.02)
    watch = ExitWatch([process])
    try:
        assert watch.exited() == [zombie.pid]
    finally:
        watch.close()
        zombie.wait()


def test_the_exit_watch_names_a_process_gone_before_it_was_watched():
    gone = _sleeper()
    process = psutil.Process(gone.pid)
    gone.kill()
    gone.wait()
    watch = ExitWatch([process])
    try:
        assert watch.exited() == [gone.pid]
    finally:
        watch.close()

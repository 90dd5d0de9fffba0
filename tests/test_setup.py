"""bin/setup without root: it names the missing Debian packages and the command that installs them, and stops
before it changes anything. `dpkg-query` and `id` are stand-ins on PATH, so the test runs on any machine as any user."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.servers import ROOT


def _stand_ins(directory: Path, missing: set[str]) -> dict[str, str]:
    directory.mkdir()
    (directory / "dpkg-query").write_text(
        "#!/bin/sh\n# the last argument is the package\nfor p; do :; done\n"
        f'case " {" ".join(sorted(missing))} " in *" $p "*) exit 1 ;; esac\nprintf \'install ok installed\'\n'
    )
    (directory / "id").write_text("#!/bin/sh\necho 1000\n")
    for tool in directory.iterdir():
        tool.chmod(0o755)
    return {**os.environ, "PATH": f"{directory}{os.pathsep}{os.environ['PATH']}"}


def test_without_root_setup_names_the_missing_packages_and_stops_before_changing_anything(tmp_path):
    env = _stand_ins(tmp_path / "bin", {"redis-server", "prometheus"})
    before = {p.name: p.stat().st_mtime_ns for p in ROOT.iterdir()}
    done = subprocess.run([str(ROOT / "bin" / "setup"), "--checks"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "missing Debian packages: redis-server prometheus" in done.stderr
    assert "sudo apt-get update && sudo apt-get install -y --no-install-recommends redis-server prometheus" in done.stderr
    assert done.stdout == ""
    assert {p.name: p.stat().st_mtime_ns for p in ROOT.iterdir()} == before


def test_setup_asks_only_for_what_its_mode_needs(tmp_path):
    env = _stand_ins(tmp_path / "bin", {"libb64-0d", "redis-server", "postgresql"})
    for mode, expected in (
        ([], "libb64-0d"),
        (["--bench"], "libb64-0d redis-server"),
        (["--checks"], "libb64-0d redis-server postgresql"),
    ):
        done = subprocess.run([str(ROOT / "bin" / "setup"), *mode], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and f"missing Debian packages: {expected}\n" in done.stderr, (mode, done.stderr)


def test_setup_refuses_an_unknown_option():
    done = subprocess.run([str(ROOT / "bin" / "setup"), "--gpu"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: bin/setup [--bench] [--checks]" in done.stderr

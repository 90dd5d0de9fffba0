"""bin/setup without root: it names the missing Debian packages and the command that installs them, and stops
before it changes anything. `dpkg-query` and `id` are stand-ins on PATH, so the test runs on any machine as any user.

The dependency locks: each package pinned once, each lock complete with those below it (serving's alone included), the
images installing serving's and the export's only; which locks bin/setup installs in each mode, and when again (in a
copy of it, with stand-ins for Python and pip), --gpu's requirements-gpu.lock in place of onnxruntime included; and
.ci/run making the pre-commit hooks' checks before the tests."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.servers import ROOT


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


@pytest.mark.e2e  # runs bin/setup
def test_without_root_setup_names_the_missing_packages_and_stops_before_changing_anything(tmp_path):
    env = _stand_ins(tmp_path / "bin", {"redis-server", "prometheus"})
    before = {p.name: p.stat().st_mtime_ns for p in ROOT.iterdir()}
    done = subprocess.run([str(ROOT / "bin" / "setup"), "--checks"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "missing Debian packages: redis-server prometheus" in done.stderr
    assert "sudo apt-get update && sudo apt-get install -y --no-install-recommends redis-server prometheus" in done.stderr
    assert done.stdout == ""
    assert {p.name: p.stat().st_mtime_ns for p in ROOT.iterdir()} == before


@pytest.mark.e2e  # runs bin/setup
def test_setup_asks_only_for_what_its_mode_needs(tmp_path):
    env = _stand_ins(tmp_path / "bin", {"libb64-0d", "redis-server", "postgresql"})
    for mode, expected in (
        ([], "libb64-0d"),
        (["--bench"], "libb64-0d redis-server"),
        (["--checks"], "libb64-0d redis-server postgresql"),
    ):
        done = subprocess.run([str(ROOT / "bin" / "setup"), *mode], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and f"missing Debian packages: {expected}\n" in done.stderr, (mode, done.stderr)


@pytest.mark.e2e  # runs bin/setup
def test_setup_refuses_an_unknown_option():
    done = subprocess.run([str(ROOT / "bin" / "setup"), "--tpu"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: bin/setup [--bench] [--checks] [--gpu | --cpu]" in done.stderr


# The dependency locks: serving's alone, the export's, the tests' and the checks' each on top of those before it.
LOCKS = ("requirements.lock", "requirements-export.lock", "requirements-test.lock", "requirements-dev.lock")
# The GPU route's (bin/setup --gpu): onnxruntime-gpu and its CUDA libraries, instead of requirements.lock's onnxruntime.
GPU_LOCK = "requirements-gpu.lock"


def _pins(lock: str) -> dict[str, str]:
    """A lock's `name==version` lines by canonical name; anything else but comments fails."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / lock).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+!-]+)", line).groups()
            assert canonicalize_name(name) not in pins, (lock, name)
            pins[canonicalize_name(name)] = version
    return pins


def test_each_package_is_pinned_once_across_the_locks():
    seen: dict[str, str] = {}
    for lock in LOCKS:
        for name in _pins(lock):
            assert name not in seen, f"{name} is pinned in {seen.get(name)} and {lock}"
            seen[name] = lock


def _direct_requirements() -> list[list[str]]:
    """pyproject.toml's requirements, one list per lock: serving's dependencies, then the export, test and dev extras."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [project["dependencies"], *(project["optional-dependencies"][extra] for extra in ("export", "test", "dev"))]


def test_each_lock_holds_what_its_requirements_need_with_the_locks_below_it():
    """Walked over the installed distributions' metadata (.venv has all four locks): pyproject.toml's requirements
    of a lock, with those of the locks below, need every package those locks pin and no other, at the pinned
    versions. So `pip install -r requirements.lock` alone (the CPU image) installs exactly serving's lock."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    installed = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
    pinned: dict[str, str] = {}
    wanted: list[str] = []
    for lock, requirements in zip(LOCKS, _direct_requirements(), strict=True):
        pinned |= _pins(lock)
        wanted += requirements
        needed: dict[str, set[str]] = {}  # name: the extras asked of it
        pending = [Requirement(text) for text in wanted]
        while pending:
            requirement = pending.pop()
            name = canonicalize_name(requirement.name)
            assert name in pinned, f"{requirement} is needed up to {lock} and pinned by no lock up to it"
            assert requirement.specifier.contains(pinned[name], prereleases=True), (lock, requirement, pinned[name])
            asked = needed.get(name)
            if asked is not None and set(requirement.extras) <= asked:
                continue
            needed[name] = (asked or set()) | set(requirement.extras)
            distribution = installed[name]
            assert distribution.version.split("+")[0] == pinned[name], (name, distribution.version, pinned[name])
            for text in distribution.requires or []:
                dependency = Requirement(text)
                environments = [{"extra": extra} for extra in ["", *needed[name]]]
                if dependency.marker is None or any(dependency.marker.evaluate(env) for env in environments):
                    pending.append(dependency)
        assert set(needed) == set(pinned), f"pinned up to {lock} but not needed: {sorted(set(pinned) - set(needed))}"


def test_pyproject_names_the_locks_versions():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pinned: dict[str, str] = {}
    for lock, requirements in zip(LOCKS, _direct_requirements(), strict=True):
        pinned |= _pins(lock)
        for text in requirements:
            requirement = Requirement(text)
            assert str(requirement.specifier) == f"=={pinned[canonicalize_name(requirement.name)]}", (lock, text)


def test_images_install_serving_and_the_export_only():
    for dockerfile in ("cpu.Dockerfile", "gpu.Dockerfile"):
        lines = (ROOT / "deploy" / "images" / dockerfile).read_text().splitlines()
        text = "\n".join(line for line in lines if not line.startswith("#"))
        assert "requirements-test.lock" not in text and "requirements-dev.lock" not in text, dockerfile
        export = text[text.index(" AS export") : text.index("\nFROM ", text.index(" AS export"))]
        assert "-r requirements.lock -r requirements-export.lock" in export, dockerfile
        assert f"torch=={_pins('requirements-export.lock')['torch']}" in export, dockerfile
        final = text[text.rindex("\nFROM ") :]
        assert "requirements-export.lock" not in final and "--from=export /opt/venv" not in final, dockerfile
    cpu = (ROOT / "deploy" / "images" / "cpu.Dockerfile").read_text()
    build = cpu[cpu.index(" AS build") : cpu.rindex("\nFROM ")]
    assert "pip install -r /tmp/requirements.lock \\" in build and "export.lock" not in build
    assert "FROM base AS build" in cpu


def test_ci_runs_the_pre_commit_checks_then_the_tests():
    import yaml

    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "echo"))]
    (repo,) = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"]
    assert repo["repo"] == "local"
    hooks = [hook["entry"].replace(" --force-exclude", "") for hook in repo["hooks"]]
    assert hooks == [".venv/bin/ruff check", ".venv/bin/ruff format --check", ".venv/bin/mypy"]
    assert ci[ci.index("bin/setup --checks") + 1 :] == [
        ".venv/bin/ruff check .",
        ".venv/bin/ruff format --check .",
        ".venv/bin/mypy",
        "bin/test",
    ]
    assert all(hook["language"] == "unsupported" for hook in repo["hooks"])  # nothing to fetch or install
    assert all(_pins("requirements-dev.lock")[tool] for tool in ("ruff", "mypy", "pre-commit"))


def _sandbox(tmp_path: Path) -> tuple[Path, dict[str, str], Path]:
    """A copy of bin/setup and the locks, with stand-ins for Python, pip and everything past the .venv step: each pip
    run is a line of the log."""
    repo, stubs, log = tmp_path / "repo", tmp_path / "stubs", tmp_path / "pip.log"
    for path in ("bin/setup", *LOCKS, GPU_LOCK, "bench/perf_analyzer/requirements.lock", "deploy/requirements-checks.lock"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, repo / path)
    stubs.mkdir()
    tool = '#!/bin/sh\necho "$(basename "$(dirname "$(dirname "$0")")") $*" >> {log}\n'
    (stubs / "python3.11").write_text(
        "#!/bin/sh\n# -c: every check passes; -m venv DIR: a venv of stand-ins\n"
        '[ "$1" = -m ] && [ "$2" = venv ] || exit 0\n'
        'mkdir -p "$3/bin"\n'
        f"printf '%s' '{tool.format(log=log)}' > \"$3/bin/pip\"\n"
        # .venv/bin/python: each run (proto.generate, the export) is a `python ...` line of the log.
        f"printf '%s' '#!/bin/sh\necho \"python $*\" >> {log}\n' > \"$3/bin/python\"\n"
        'chmod 755 "$3/bin/pip" "$3/bin/python"\n'
    )
    (stubs / "dpkg-query").write_text("#!/bin/sh\nprintf 'install ok installed'\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    perf = repo / ".venv-perf"
    (perf / "lib/python3.11/site-packages/nvidia/cuda_runtime/lib").mkdir(parents=True)
    (perf / "bin").mkdir()
    (perf / "bin" / "perf_analyzer").write_text("#!/bin/sh\n")
    (perf / "bin" / "perf_analyzer").chmod(0o755)
    digest = hashlib.sha256((repo / "bench/perf_analyzer/requirements.lock").read_bytes()).hexdigest()
    (perf / ".requirements.sha256").write_text(digest + "\n")
    return repo, {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}, log


@pytest.mark.e2e  # runs bin/setup
def test_setup_installs_the_locks_of_its_mode_and_again_only_when_one_changed(tmp_path):
    repo, env, log = _sandbox(tmp_path)

    def setup(*mode: str) -> list[str]:
        log.write_text("")
        done = subprocess.run([str(repo / "bin" / "setup"), *mode], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return [line for line in log.read_text().splitlines() if line.startswith(".venv ")]

    everyday = "-r requirements.lock -r requirements-export.lock -r requirements-test.lock"
    first = setup()
    assert first[0].endswith(f"install --quiet --progress-bar off torch=={_pins('requirements-export.lock')['torch']}")
    assert first[1:] == [f".venv install --quiet --progress-bar off {everyday}"]
    assert setup() == []
    assert setup("--checks") == [first[0], f".venv install --quiet --progress-bar off {everyday} -r requirements-dev.lock"]
    assert setup("--checks") == [] and setup() == []  # the everyday mode needs nothing that --checks did not install
    with (repo / "requirements-test.lock").open("a") as lock:
        lock.write("# changed\n")
    assert setup() == first


def test_the_gpu_lock_pins_only_what_no_other_lock_does_and_onnxruntime_gpu_at_onnxruntimes_version():
    """requirements-gpu.lock goes on top of the everyday locks (with requirements.lock's onnxruntime line taken out):
    a package pinned in both would be pinned twice, and onnxruntime-gpu at another version would be another
    onnxruntime than the one the CPU route is tested on."""
    gpu = _pins(GPU_LOCK)
    everyday = {name: version for lock in LOCKS for name, version in _pins(lock).items()}
    assert sorted(set(gpu) & set(everyday)) == []
    assert gpu["onnxruntime-gpu"] == everyday["onnxruntime"]
    assert "onnxruntime" not in gpu


@pytest.mark.e2e  # runs bin/setup
def test_setup_gpu_installs_onnxruntime_gpu_instead_of_onnxruntime_and_stays_on_it_until_cpu(tmp_path):
    repo, env, log = _sandbox(tmp_path)
    site_packages = repo / ".venv" / "lib" / "python3.11" / "site-packages"

    def installed(distribution: str) -> None:
        """The onnxruntime pip would have left in .venv: the stand-in pip installs and removes nothing."""
        for each in site_packages.glob("onnxruntime*.dist-info"):
            each.rmdir()
        (site_packages / f"{distribution}-1.31.1.dist-info").mkdir(parents=True)

    def setup(*mode: str) -> tuple[list[str], list[str]]:
        """bin/setup's pip runs in .venv, and its .venv/bin/python runs."""
        log.write_text("")
        done = subprocess.run([str(repo / "bin" / "setup"), *mode], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        lines = log.read_text().splitlines()
        return [line for line in lines if line.startswith(".venv ")], [line for line in lines if line.startswith("python ")]

    torch = f".venv install --quiet --progress-bar off torch=={_pins('requirements-export.lock')['torch']}"
    everyday = (
        ".venv install --quiet --progress-bar off -r requirements.lock -r requirements-export.lock -r requirements-test.lock"
    )
    # requirements.lock's own onnxruntime would reinstall the module onnxruntime-gpu provides: a copy without it.
    serving = "-r .venv/requirements-serving-gpu.lock -r requirements-export.lock -r requirements-test.lock"
    gpu = f".venv install --quiet --progress-bar off {serving} -r {GPU_LOCK}"

    pip, python = setup()
    assert pip == [torch, everyday] and python[-1] == "python -m export"
    installed("onnxruntime")
    pip, python = setup("--gpu")
    # The CPU package goes first: removed after onnxruntime-gpu, it would take the module's files with it.
    assert pip == [torch, ".venv uninstall --quiet --yes onnxruntime", gpu]
    assert python[-1] == "python -m export --target gpu-cuda"
    serving_lines = (ROOT / "requirements.lock").read_text().splitlines()
    assert (repo / ".venv" / "requirements-serving-gpu.lock").read_text().splitlines() == [
        line for line in serving_lines if not line.startswith("onnxruntime==")
    ]
    # Exactly one line taken out: onnxruntime's pin, which onnxruntime-gpu's takes the place of.
    assert [line for line in serving_lines if line.startswith("onnxruntime")] == [
        f"onnxruntime=={_pins('requirements.lock')['onnxruntime']}"
    ]
    assert (repo / ".venv" / ".onnxruntime").read_text() == "gpu\n"
    installed("onnxruntime_gpu")

    # Sticky: bin/serve and bin/test run bin/setup without a mode, and must keep a GPU host's onnxruntime and export.
    pip, python = setup()
    assert pip == [] and python[-1] == "python -m export --target gpu-cuda"
    pip, _ = setup("--checks")
    assert pip == [torch, f"{gpu} -r requirements-dev.lock"]
    assert setup("--gpu")[0] == []

    pip, python = setup("--cpu")
    assert pip == [torch, ".venv uninstall --quiet --yes onnxruntime-gpu", everyday]
    assert python[-1] == "python -m export"
    assert (repo / ".venv" / ".onnxruntime").read_text() == "cpu\n"
    installed("onnxruntime")
    assert setup() == ([], ["python -m proto.generate", "python -m export"])

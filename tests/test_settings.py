import subprocess
import sys
from pathlib import Path

import pytest

from gateway.ops.settings import HIDDEN, Settings, parse_settings, redacted_setting
from harness.servers import ROOT


def test_defaults_are_the_documented_ports():
    settings = parse_settings([], environ={})
    assert (settings.host, settings.http_port, settings.grpc_port) == ("127.0.0.1", 8080, 50051)
    assert settings == Settings()


def test_the_default_repository_and_run_dir_are_the_checkouts_own():
    # What bin/serve and a bare `python -m gateway` serve from: the export writes to the same place.
    from export.repository import DEFAULT_REPOSITORY

    settings = parse_settings([], environ={})
    assert settings.model_repository == ROOT / "model_repository" == DEFAULT_REPOSITORY
    assert settings.run_dir == ROOT / ".run"


def test_environment_sets_and_flag_overrides():
    environ = {"EMBED_HTTP_PORT": "9000", "EMBED_GRPC_PORT": "9001", "EMBED_TRUNCATE": "true", "EMBED_RUN_DIR": "/tmp/x"}
    settings = parse_settings(["--grpc-port", "9100"], environ=environ)
    assert settings.http_port == 9000
    assert settings.grpc_port == 9100
    assert settings.truncate is True
    assert settings.run_dir == Path("/tmp/x")
    assert parse_settings(["--no-truncate"], environ=environ).truncate is False


# Secrets in settings: whatever prints them (--help, the startup banner, a repr, an error) shows neither a URL's
# password nor a key.
SECRET = "s3cret-Pw"
SECRET_ENVIRON = {
    "EMBED_AUTH_DATABASE": f"postgresql://app:{SECRET}@db.internal:5432/tokens?sslmode=require",
    "EMBED_CACHE_URL": f"redis://:{SECRET}@cache.internal:6379/0",
    "EMBED_TRITON_ADMIN_KEY": SECRET,
}


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("auth_database", f"postgresql://app:{SECRET}@db:5432/tokens", "postgresql://app:***@db:5432/tokens"),
        ("auth_database", f"postgres://app:{SECRET}@db/tokens?sslmode=require", "postgres://app:***@db/tokens?sslmode=require"),
        ("cache_url", f"redis://:{SECRET}@cache:6379/0", "redis://:***@cache:6379/0"),
        ("cache_url", f"rediss://default:{SECRET}@cache:6380", "rediss://default:***@cache:6380"),
        # unescaped characters that end the authority early, and a password given as a query parameter
        ("auth_database", f"postgresql://app:p@ss/{SECRET}@db/tokens", "postgresql://app:***@db/tokens"),
        ("cache_url", f"redis://:pa?ss{SECRET}@cache:6379", "redis://:***@cache:6379"),
        ("cache_url", f"unix:///run/redis.sock?db=0&password={SECRET}", "unix:///run/redis.sock?db=0&password=***"),
        (
            "auth_database",
            f"postgresql://app@db/tokens?sslpassword={SECRET}&sslmode=verify-full",
            "postgresql://app@db/tokens?sslpassword=***&sslmode=verify-full",
        ),
        ("auth_database", f"host=db user=app password={SECRET} dbname=tokens", "host=db user=app password=*** dbname=tokens"),
        # nothing secret: left as it is
        ("auth_database", "postgresql://app@db:5432/tokens", "postgresql://app@db:5432/tokens"),
        ("auth_database", "/var/lib/embedding/auth.sqlite3", "/var/lib/embedding/auth.sqlite3"),
        ("triton_url", "triton-0:8001,triton-1:8001", "triton-0:8001,triton-1:8001"),
        ("cache_url", "", ""),
        ("http_port", 8080, "8080"),
        # a secret setting: only whether it is set
        ("triton_admin_key", SECRET, HIDDEN),
        ("triton_admin_key", "", ""),
        ("some_api_token", SECRET, HIDDEN),
    ],
)
def test_redacted_setting_hides_passwords_and_keys(name, value, shown):
    assert redacted_setting(name, value) == shown
    assert SECRET not in redacted_setting(name, value)


def test_help_shows_the_environment_defaults_without_their_secrets(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping: a secret cut in two would pass unseen
    # a URL-escaped password: argparse's %-formatting of the help must not choke on it either
    environ = {**SECRET_ENVIRON, "EMBED_CACHE_URL": f"redis://:{SECRET}%40x@cache.internal:6379/0"}
    with pytest.raises(SystemExit) as exit_:
        parse_settings(["--help"], environ=environ)
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert SECRET not in shown
    assert "default postgresql://app:***@db.internal:5432/tokens?sslmode=require)" in shown
    assert "default redis://:***@cache.internal:6379/0)" in shown
    assert f"EMBED_TRITON_ADMIN_KEY, default {HIDDEN})" in shown


def test_settings_keep_the_secrets_they_hide_from_repr():
    settings = parse_settings([], environ=SECRET_ENVIRON)
    assert settings.cache_url == SECRET_ENVIRON["EMBED_CACHE_URL"] and settings.triton_admin_key == SECRET
    shown = repr(settings)
    assert SECRET not in shown and str(settings) == shown
    assert "cache_url='redis://:***@cache.internal:6379/0'" in shown and "http_port=8080" in shown
    assert f"triton_admin_key='{HIDDEN}'" in shown


def test_an_unreachable_token_store_is_named_without_its_password():
    from gateway.__main__ import _authenticator

    settings = Settings(auth=True, auth_database=f"postgresql://app:{SECRET}@127.0.0.1:1/tokens")
    with pytest.raises(SystemExit) as exit_:
        _authenticator(settings)
    assert "the token store postgresql://app:***@127.0.0.1:1/tokens is unavailable" in str(exit_.value)
    assert SECRET not in str(exit_.value)


def test_gateway_help_in_a_real_process_redacts_the_environment():
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "400", **SECRET_ENVIRON},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "--auth-database" in done.stdout and "postgresql://app:***@db.internal" in done.stdout
    assert SECRET not in done.stdout + done.stderr


def test_workers_must_be_at_least_one(capsys):
    from gateway.__main__ import main

    assert main(["--workers", "0"]) == 2
    assert "--workers must be 1 or more, got 0" in capsys.readouterr().err


def test_a_worker_learns_its_role_from_its_parent_and_admits_its_share_rounded_up(monkeypatch):
    from gateway.workers import ROLE_ENV, WorkerRole

    role = WorkerRole((3,), (4, 5), workers=3, ready_file="/nonexistent")
    monkeypatch.delenv(ROLE_ENV, raising=False)
    assert WorkerRole.of_this_process() is None  # a single gateway, or the parent
    monkeypatch.setenv(ROLE_ENV, role.encoded())
    assert WorkerRole.of_this_process() == role
    assert [role.share(limit) for limit in (32768, 128, 2, 1)] == [10923, 43, 1, 1]

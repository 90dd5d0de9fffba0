from pathlib import Path

from gateway.ops.settings import Settings, parse_settings


def test_defaults_are_the_documented_ports():
    settings = parse_settings([], environ={})
    assert (settings.host, settings.http_port, settings.grpc_port) == ("127.0.0.1", 8080, 50051)
    assert settings == Settings()


def test_environment_sets_and_flag_overrides():
    environ = {"EMBED_HTTP_PORT": "9000", "EMBED_GRPC_PORT": "9001", "EMBED_TRUNCATE": "true", "EMBED_RUN_DIR": "/tmp/x"}
    settings = parse_settings(["--grpc-port", "9100"], environ=environ)
    assert settings.http_port == 9000
    assert settings.grpc_port == 9100
    assert settings.truncate is True
    assert settings.run_dir == Path("/tmp/x")
    assert parse_settings(["--no-truncate"], environ=environ).truncate is False

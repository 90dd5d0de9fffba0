"""The defaults without authentication: loopback only, curl works as before, and the guards that keep it that way."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.servers import ROOT, raw_http

pytestmark = pytest.mark.e2e


def request(service, method: str, path: str, body: dict | None = None, headers: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    status, _, content = raw_http(
        service.http_port, method, path, data, {"Content-Type": "application/json", **(headers or {})}, 60
    )
    return status, content


def test_an_open_gateway_refuses_to_listen_on_a_network_address(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "--host", "0.0.0.0", f"--run-dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0 without authentication" in done.stderr and "--auth" in done.stderr
    assert not (tmp_path / "triton.pid").exists()  # refused before Triton was started


def test_without_auth_the_gateway_answers_anyone_on_loopback(service, model_name):
    status, body = request(service, "POST", "/v1/embeddings", {"model": model_name, "input": "hello"})
    assert status == 200 and len(json.loads(body)["data"]) == 1


def test_without_auth_a_request_for_another_host_name_is_refused(service, model_name):
    # What a browser sends after DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1.
    for host in ("evil.example", f"evil.example:{service.http_port}", "127.0.0.1.evil.example"):
        status, body = request(service, "POST", "/v1/embeddings", {"model": model_name, "input": "hi"}, {"Host": host})
        assert status == 403, host
        assert json.loads(body)["error"]["code"] == "forbidden"
    for host in (f"localhost:{service.http_port}", f"127.0.0.1:{service.http_port}", "localhost", f"[::1]:{service.http_port}"):
        status, _ = request(service, "GET", "/v1/models", headers={"Host": host})
        assert status == 200, host


def test_without_auth_the_token_routes_say_how_to_turn_it_on(service):
    status, body = request(service, "GET", "/users/me/tokens")
    assert status == 404 and "--auth" in json.loads(body)["error"]
    status, body = request(service, "POST", "/get_token", {"email": "a@b.c", "password": "x"})
    assert status == 404 and "--auth" in json.loads(body)["error"]

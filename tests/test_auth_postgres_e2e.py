"""Two gateways sharing users and tokens in one real PostgreSQL server: revocation reaches both, and a store that
goes down makes them not ready and answer 503 rather than let anyone through."""

from __future__ import annotations

import time

import grpc
import psycopg
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.postgres_server import PostgresServer
from harness.servers import gateway_cli, start_service
from harness.waiting import wait_until

pytestmark = pytest.mark.e2e

USER = "ops@example.com"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    with PostgresServer() as postgres:
        database = f"--auth-database={postgres.url}"
        gateway_cli("users", "add", USER, "--role", "client", database)
        token = gateway_cli("tokens", "create", "--user", USER, "--description", "shared", database).strip()
        first = start_service(tmp_path_factory.mktemp("first"), extra_args=["--auth", database])
        try:
            # The second replica uses the first one's Triton, as replicas behind one GPU server would.
            second = start_service(
                tmp_path_factory.mktemp("second"), extra_args=["--auth", database, f"--triton-url={first.triton_grpc_url}"]
            )
            try:
                yield postgres, first, second, token
            finally:
                second.stop()
        finally:
            first.stop()


def grpc_health(service) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def embed(service, token: str, model_name: str) -> requests.Response:
    return requests.post(
        f"{service.http_url}/v1/embeddings",
        json={"model": model_name, "input": ["shared store"]},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def test_a_token_created_on_one_replica_works_on_the_other_and_its_revocation_reaches_it_within_a_second(replicas, model_name):
    _, first, second, token = replicas
    assert embed(first, token, model_name).status_code == 200
    assert embed(second, token, model_name).status_code == 200

    created = requests.post(
        f"{first.http_url}/users/me/tokens", json={"description": "roaming"}, headers={"Authorization": f"Bearer {token}"}
    )
    roaming, token_id = created.json()["token"], created.json()["metadata"]["token_id"]
    assert embed(second, roaming, model_name).status_code == 200  # cached on the second replica now

    revoked = requests.delete(f"{first.http_url}/users/me/tokens/{token_id}", headers={"Authorization": f"Bearer {token}"})
    assert revoked.status_code == 204
    revoked_at = time.monotonic()
    while embed(second, roaming, model_name).status_code == 200:
        assert time.monotonic() - revoked_at < 1.0, "the second replica still accepts a token revoked on the first"
        time.sleep(0.05)
    print(f"[auth] revoked on the first replica, refused by the second after {time.monotonic() - revoked_at:.3f} s")
    assert embed(second, roaming, model_name).status_code == 401
    assert embed(first, roaming, model_name).status_code == 401


def listed_usage(service, headers: dict[str, str], token_id: int) -> dict:
    (usage,) = [
        t["usage"]
        for t in requests.get(f"{service.http_url}/users/me/tokens", headers=headers).json()
        if t["token_id"] == token_id
    ]
    return usage


def stored_usage(postgres: PostgresServer, token_id: int) -> dict:
    with psycopg.connect(postgres.url) as connection:
        row = connection.execute("SELECT requests, texts, prompt_tokens FROM tokens WHERE id = %s", (token_id,)).fetchone()
    return dict(zip(("requests", "texts", "prompt_tokens"), row))


def test_usage_from_both_replicas_adds_up_in_the_shared_store(replicas, model_name):
    postgres, first, second, token = replicas
    headers = {"Authorization": f"Bearer {token}"}
    created = requests.post(f"{first.http_url}/users/me/tokens", json={"description": "counted"}, headers=headers).json()
    counted, token_id = created["token"], created["metadata"]["token_id"]
    for service in (first, second, second):
        assert embed(service, counted, model_name).status_code == 200
    # Each replica writes its counts every half second. A replica's listing adds what it has counted and not yet
    # written to what the store holds: once both have written theirs, both listings show what the store holds.
    wait_until(
        lambda: all(listed_usage(service, headers, token_id) == stored_usage(postgres, token_id) for service in (first, second)),
        timeout_s=30,
        interval_s=0.1,
        what="both replicas to write the token's usage to the store",
    )
    for service in (first, second):
        usage = listed_usage(service, headers, token_id)
        assert usage["requests"] == 3 and usage["texts"] == 3


def test_a_store_that_goes_down_makes_both_replicas_unready_and_refuse_with_503(replicas, model_name):
    postgres, first, second, token = replicas
    postgres.kill()
    try:
        for service in (first, second):
            deadline = time.monotonic() + 5
            while requests.get(f"{service.http_url}/health/ready", timeout=5).status_code != 503:
                assert time.monotonic() < deadline, "still ready with the token store down"
                time.sleep(0.1)
            assert requests.get(f"{service.http_url}/health/live", timeout=5).status_code == 200
            assert grpc_health(service) == health_pb2.HealthCheckResponse.NOT_SERVING
            refused = embed(service, token, model_name)
            assert refused.status_code == 503 and "token store" in refused.json()["error"]["message"]
            assert refused.headers["retry-after"]
    finally:
        postgres.restart()
    for service in (first, second):
        deadline = time.monotonic() + 10
        while requests.get(f"{service.http_url}/health/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "not ready again after the token store came back"
            time.sleep(0.2)
        assert embed(service, token, model_name).status_code == 200
        assert grpc_health(service) == health_pb2.HealthCheckResponse.SERVING

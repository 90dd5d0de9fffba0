"""The multi-node rehearsal, on this machine: two gateways over two Tritons, sharing a real PostgreSQL (users and
tokens) and a real Redis (the embedding cache), as replicas on Kubernetes do.

- `kill -9` of one Triton under steady load through both gateways loses no request, and the Triton, started
  again on its address (as Kubernetes restarts a pod), is taken back and gets work;
- a token revoked through one gateway is refused by the other;
- a text embedded through one gateway is answered by the other from the cache, without reaching any Triton
  (their statistics prove it).

The gateways name the Tritons differently, one by address and one by DNS name (`localhost`), which they resolve.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.resilience import Load, p99
from gateway.core.catalog import Catalog
from gateway.triton.process import TritonPorts, TritonProcess
from harness.postgres_server import PostgresServer
from harness.redis_server import RedisServer
from harness.servers import MODEL_REPOSITORY, RunningService, free_ports, gateway_cli, start_service
from tests.test_metrics_and_logs import value

pytestmark = pytest.mark.e2e

USER = "ops@example.com"


@dataclass
class Cluster:
    redis: RedisServer
    tritons: list[TritonProcess]
    gateways: list[RunningService]
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def triton_successes(triton: TritonProcess) -> int:
    """Inferences that Triton has served, over all its models (tokenizer, encoder, pooling steps and ensembles)."""
    with urllib.request.urlopen(f"{triton.http_url}/v2/models/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"]
    return sum(int(model["inference_stats"]["success"]["count"]) for model in stats)


def gateway_metrics(gateway: RunningService) -> dict:
    with urllib.request.urlopen(f"{gateway.http_url}/metrics", timeout=10) as response:
        body = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    models = Catalog.from_repository(MODEL_REPOSITORY).triton_models
    with PostgresServer() as postgres, RedisServer() as redis:
        database = f"--auth-database={postgres.url}"
        gateway_cli("users", "add", USER, "--role", "client", database)
        token = gateway_cli("tokens", "create", "--user", USER, "--description", "rehearsal", database).strip()
        tritons = []
        for index in range(2):
            work_dir = tmp_path_factory.mktemp(f"triton{index}")
            tritons.append(
                TritonProcess(MODEL_REPOSITORY, models, TritonPorts(*free_ports(3)), work_dir, work_dir / "triton.log")
            )
        gateways: list[RunningService] = []
        try:
            starts = [threading.Thread(target=triton.start) for triton in tritons]
            for thread in starts:
                thread.start()
            for thread in starts:
                thread.join()
            by_address = ",".join(triton.grpc_url for triton in tritons)
            by_name = ",".join(f"localhost:{triton.ports.grpc}" for triton in tritons)
            for index, targets in enumerate((by_address, by_name)):
                args = ["--auth", database, f"--triton-url={targets}", f"--cache-url={redis.url}", "--triton-dns-refresh-s=1"]
                gateways.append(start_service(tmp_path_factory.mktemp(f"gateway{index}"), extra_args=args))
            yield Cluster(redis, tritons, gateways, token)
        finally:
            for gateway in gateways:
                gateway.stop()
            for triton in tritons:
                triton.stop()


def embed(gateway: RunningService, cluster: Cluster, texts: list[str], token: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else cluster.auth
    return requests.post(
        f"{gateway.http_url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": texts}, headers=headers, timeout=30
    )


def test_both_gateways_see_both_tritons(cluster):
    for gateway in cluster.gateways:
        found = gateway_metrics(gateway)
        assert value(found, "embed_gateway_triton_endpoints", state="ready") == 2
        assert value(found, "embed_gateway_triton_endpoints", state="unready") == 0


def test_a_text_embedded_through_one_gateway_is_served_by_the_other_from_the_cache_without_triton(cluster):
    first, second = cluster.gateways
    texts = [f"a query that users repeat {uuid.uuid4()}", f"and another one {uuid.uuid4()}"]
    keys_before = cluster.redis.client().dbsize()
    computed = embed(first, cluster, texts)
    assert computed.status_code == 200
    # The entries are written after the answer has left: wait for them.
    deadline = time.monotonic() + 5
    while cluster.redis.client().dbsize() < keys_before + len(texts):
        assert time.monotonic() < deadline, "the first gateway did not write its embeddings to the cache"
        time.sleep(0.02)

    served_before = [triton_successes(triton) for triton in cluster.tritons]
    hits_before = value(gateway_metrics(second), "embed_gateway_cache_texts_total", result="hit")
    cached = embed(second, cluster, texts)
    # The same text by another contract and representation whose prompt is the same: the same entry.
    semantic = requests.post(
        f"{second.http_url}/semantic_embed",
        json={"model": "all-minilm-l6-v2", "prompt": texts[0], "representation": "symmetric"},
        headers=cluster.auth,
        timeout=30,
    )
    served_after = [triton_successes(triton) for triton in cluster.tritons]

    assert cached.status_code == 200 and semantic.status_code == 200, (cached.text, semantic.text)
    assert [row["embedding"] for row in cached.json()["data"]] == [row["embedding"] for row in computed.json()["data"]]
    assert cached.json()["usage"] == computed.json()["usage"]
    assert semantic.json()["embedding"] == computed.json()["data"][0]["embedding"]
    assert served_after == served_before, "a cached text reached Triton"
    found = gateway_metrics(second)
    assert value(found, "embed_gateway_cache_texts_total", result="hit") == hits_before + 3
    assert value(found, "embed_gateway_cache_tokens_saved_total") > 0
    print(
        f"[rehearsal] cache: 3 texts served by the second gateway from Redis; Triton inferences before/after {served_before} / {served_after}"
    )


def test_a_token_revoked_through_one_gateway_is_refused_by_the_other(cluster):
    first, second = cluster.gateways
    created = requests.post(
        f"{first.http_url}/users/me/tokens", json={"description": "roaming"}, headers=cluster.auth, timeout=30
    )
    assert created.status_code == 200, created.text
    roaming, token_id = created.json()["token"], created.json()["metadata"]["token_id"]
    assert embed(second, cluster, ["roaming"], roaming).status_code == 200
    revoked = requests.delete(f"{first.http_url}/users/me/tokens/{token_id}", headers=cluster.auth, timeout=30)
    assert revoked.status_code == 204
    revoked_at = time.monotonic()
    while (refused := embed(second, cluster, ["roaming"], roaming)).status_code == 200:
        assert time.monotonic() - revoked_at < 2.0, "the second gateway still accepts a token revoked through the first"
        time.sleep(0.05)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthenticated"
    print(f"[rehearsal] revoked through the first gateway, refused by the second after {time.monotonic() - revoked_at:.3f} s")


async def wait_for_both_ready(cluster: Cluster, timeout_s: float) -> float:
    started = time.monotonic()
    while True:
        ready = [
            value(await asyncio.to_thread(gateway_metrics, g), "embed_gateway_triton_endpoints", state="ready")
            for g in cluster.gateways
        ]
        if ready == [2, 2]:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"the restarted Triton was not taken back: ready counts {ready}"
        await asyncio.sleep(0.1)


async def test_kill_9_of_one_triton_under_load_through_both_gateways_fails_no_request_and_it_rejoins(cluster):
    victim = cluster.tritons[0]
    text = ["a sentence about a cat that sits outside"]
    loads = [Load(g.http_url, 8, text, headers=cluster.auth, distinct=True) for g in cluster.gateways]
    async with loads[0], loads[1]:
        await asyncio.sleep(3)
        killed_at = time.monotonic()
        os.kill(victim.process.pid, signal.SIGKILL)
        await asyncio.sleep(3)
        # As Kubernetes would restart the pod: the group (stubs, shared memory) cleaned up, Triton started on its address.
        await asyncio.to_thread(victim.stop, 0)
        await asyncio.to_thread(victim.start)
        restarted_at = time.monotonic()
        rejoin_s = await wait_for_both_ready(cluster, timeout_s=15)
        served_before = triton_successes(victim)
        await asyncio.sleep(3)
        served_after = triton_successes(victim)
    outcomes = [o for load in loads for o in load.outcomes]
    statuses = {o.status for o in outcomes}
    during = [o for o in outcomes if killed_at <= o.sent_at <= restarted_at]
    figures = {
        "requests": len(outcomes),
        "per_gateway": [len(load.outcomes) for load in loads],
        "failed": sum(o.status != 200 for o in outcomes),
        "while_one_triton_was_down": len(during),
        "p99_s": p99([o.done_at - o.sent_at for o in outcomes]),
        "down_s": round(restarted_at - killed_at, 1),
        "rejoined_after_restart_s": round(rejoin_s, 2),
        "rejoined_triton_inferences_in_3_s": served_after - served_before,
    }
    print(f"[rehearsal] kill -9 of one Triton under load: {json.dumps(figures)}")
    assert statuses == {200}, [(o.status, o.body[:200]) for o in outcomes if o.status != 200][:5]
    assert len(during) > 50 and min(figures["per_gateway"]) > 50
    assert served_after > served_before, "the restarted Triton gets no work"


def test_a_cache_that_goes_down_only_costs_its_speed_up_and_is_used_again_when_back(cluster):
    first, second = cluster.gateways
    cluster.redis.kill()
    try:
        started = time.monotonic()
        answers = [embed(gateway, cluster, [f"while the cache is down {i}"]) for i in range(10) for gateway in (first, second)]
        elapsed = time.monotonic() - started
        assert [a.status_code for a in answers] == [200] * 20, [a.text for a in answers if a.status_code != 200][:3]
        for gateway in (first, second):
            found = gateway_metrics(gateway)
            assert value(found, "embed_gateway_cache_up") == 0
            assert value(found, "embed_gateway_cache_texts_total", result="unavailable") >= 1
    finally:
        cluster.redis.start()  # empty, on its port, as a restarted cache pod is
    print(f"[rehearsal] Redis killed: 20 requests through both gateways answered in {elapsed:.2f} s, all 200")
    # Taken up again once its retry pause has passed: a text computed now is stored and found by the other gateway.
    text = [f"after the cache came back {uuid.uuid4()}"]
    deadline = time.monotonic() + 10
    while cluster.redis.client().dbsize() == 0:
        assert time.monotonic() < deadline, "the gateways did not write to the cache after it came back"
        assert embed(first, cluster, text).status_code == 200
        time.sleep(0.2)
    hits_before = value(gateway_metrics(second), "embed_gateway_cache_texts_total", result="hit")
    assert embed(second, cluster, text).status_code == 200
    assert value(gateway_metrics(second), "embed_gateway_cache_texts_total", result="hit") == hits_before + 1

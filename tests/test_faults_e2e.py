"""Faults injected into the real Triton under load: nothing lost, nothing hung, nothing left behind.

Each test starts its own gateway and Triton (the session's shared service is never harmed), prints its
figures, and after the gateway has stopped checks that no Triton or stub process and no /dev/shm region
of that service outlives it.
"""

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import resilience
from harness.servers import start_service
from harness.waiting import eventually

pytestmark = pytest.mark.e2e


class Watched:
    """A fresh service whose shm regions are collected along the way, for the leftover check."""

    def __init__(self, service):
        self.service = service
        self.regions: set[str] = set()

    def note_regions(self) -> None:
        self.regions |= resilience.shm_regions(self.service)


@pytest.fixture
def fresh(tmp_path, request):
    extra = getattr(request, "param", [])
    watched = Watched(start_service(tmp_path / "service", extra_args=extra))
    watched.note_regions()
    yield watched
    watched.service.stop()
    assert resilience.leftovers(watched.service, watched.regions) == []


async def _serving_again(watched: Watched) -> None:
    await resilience.wait_healthy(watched.service, timeout_s=30)
    watched.note_regions()


@pytest.mark.parametrize("victim", ["triton", "tokenizer", "encoder"])
async def test_kill_under_load_loses_no_accepted_request(fresh, victim):
    figures = await resilience.kill_under_load(fresh.service, victim)
    await _serving_again(fresh)
    figures.print()
    assert figures.accepted > 100
    assert figures.failed == {}, f"accepted requests failed: {figures.failed}"
    assert figures.recovery_s is not None and figures.recovery_s < 15


@pytest.mark.parametrize("fresh", [["--triton-stall-restart-s=60"]], indirect=True)
async def test_stalled_triton_answers_within_the_deadline_and_health_says_so(fresh):
    service = fresh.service
    pid = resilience.triton_pid(service)
    os.kill(pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        await asyncio.sleep(2.5)  # the readiness probe gives up after 1 s
        health_started = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(f"{service.http_url}/health", timeout=5)
        assert time.monotonic() - health_started < 1
        assert raised.value.code == 503 and json.loads(raised.value.read())["status"] == "unavailable"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

        body = json.dumps({"model": resilience.MODEL, "input": "is anyone there?"}).encode()
        call = urllib.request.Request(
            f"{service.http_url}/v1/embeddings", body, {"Content-Type": "application/json", "X-Request-Timeout": "2"}
        )
        asked = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(call, timeout=10)
        waited = time.monotonic() - asked
        print(
            f"[faults] stalled Triton: 503 after {waited:.2f} s for a 2 s deadline; stopped {time.monotonic() - stopped_at:.1f} s"
        )
        assert raised.value.code == 503 and raised.value.headers["Retry-After"]
        assert json.loads(raised.value.read())["error"]["code"] == "deadline_exceeded"
        assert 1.9 < waited < 3
    finally:
        os.kill(pid, signal.SIGCONT)
    await _serving_again(fresh)
    figures = await resilience.stall(service, stall_s=4, timeout_s=2)
    figures.print()
    assert set(figures.failed) <= {"503"}, figures.failed
    assert figures.recovery_s is not None and figures.recovery_s < 2


@pytest.mark.parametrize("fresh", [["--triton-stall-restart-s=2"]], indirect=True)
async def test_a_triton_stalled_for_good_is_restarted_and_requests_in_flight_succeed(fresh):
    async with resilience.Load(fresh.service.http_url, 4, ["waiting for a restart"]) as load:
        await asyncio.sleep(1)
        stopped_at = time.monotonic()
        os.kill(resilience.triton_pid(fresh.service), signal.SIGSTOP)
        await asyncio.sleep(12)
    await _serving_again(fresh)
    figures = load.figures("SIGSTOP for good, restart after 2 s")
    figures.recovery_s = load.recovery_s(stopped_at)
    figures.print()
    assert figures.failed == {}
    assert figures.recovery_s is not None and figures.recovery_s < 15


@pytest.mark.parametrize("fresh", [["--triton-stall-restart-s=60", "--shutdown-grace-s=3"]], indirect=True)
async def test_sigterm_with_a_stalled_triton_ends_within_the_grace_period(fresh):
    service = fresh.service
    async with resilience.Load(service.http_url, 2, ["in flight at the stop"]):
        await asyncio.sleep(1)
        os.kill(resilience.triton_pid(service), signal.SIGSTOP)
        await asyncio.sleep(1)
        stopping = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(service.process.wait, 30)
        took = time.monotonic() - stopping
    print(f"[faults] SIGTERM with a stalled Triton: gateway exited {exit_code} after {took:.1f} s (grace 3 s)")
    # The grace period, then Triton's own exit (it gets SIGCONT with its SIGTERM) or its kill.
    assert took < 3 + 6


async def test_a_client_that_disconnects_has_its_work_cancelled(fresh):
    service = fresh.service
    texts = resilience.sts_sentences()[:1024] * 2
    body = json.dumps({"model": resilience.MODEL, "input": texts}).encode()

    def encoder_rows() -> int:
        return int(_encoder_stats(service)["inference_count"])

    before = encoder_rows()
    curl = subprocess.Popen(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
            f"{service.http_url}/v1/embeddings",
        ],
        stdin=subprocess.PIPE,
    )
    curl.stdin.write(body)
    curl.stdin.close()
    await eventually(lambda: encoder_rows() > before, timeout_s=60, what="the encoder to compute the first rows of the request")
    curl.kill()
    curl.wait()
    left_at = time.monotonic()
    await asyncio.sleep(2)
    settled = encoder_rows()
    await asyncio.sleep(2)
    computed = encoder_rows() - before
    latencies = await resilience.probe_latencies(service.http_url, seconds=1)
    print(
        f"[faults] disconnect: {computed} of {len(texts)} rows computed; probe p99 {resilience.p99(latencies)} s, "
        f"{time.monotonic() - left_at:.1f} s after the client left"
    )
    assert encoder_rows() - settled <= len(latencies), "rows were still computed 2 s after the client left"
    assert computed < len(texts) * 0.8
    assert resilience.p99(latencies) < 0.5


def _encoder_stats(service) -> dict:
    with urllib.request.urlopen(f"{service.triton_http_url}/v2/models/{resilience.MODEL}-encoder/stats") as response:
        return json.loads(response.read())["model_stats"][0]


async def test_big_batches_do_not_hold_up_one_text_requests(fresh):
    before = _encoder_stats(fresh.service)
    figures = await resilience.big_batches(fresh.service, bulk_clients=16, seconds=15)
    figures.print()
    after = _encoder_stats(fresh.service)
    executions = int(after["execution_count"]) - int(before["execution_count"])
    computing = int(after["inference_stats"]["compute_infer"]["ns"]) - int(before["inference_stats"]["compute_infer"]["ns"])
    execution_s = computing / 1e9 / executions
    # A probe is not queued behind the 16 clients' 32,768 texts (minutes of work here); it waits for the bulk
    # executions running when it comes, then runs in one: about two executions. At least 1 s, the bound this test had
    # when every machine here had AVX-512; on an AVX2 one an execution took 0.745 s on average and the p99 1.63 s.
    bound = max(1.0, 2 * execution_s + 0.5)
    print(f"[faults] big batches: encoder executions {execution_s:.3f} s on average, probe p99 {figures.probe_p99_s} s")
    assert figures.probe_p99_s <= bound, (figures.probe_p99_s, execution_s)
    assert figures.succeeded > 0
    assert set(figures.failed) <= {"503"}, figures.failed


async def test_an_external_triton_is_reconnected_when_it_comes_back(tmp_path):
    """With --triton-url the gateway only watches: not ready while that Triton is away, serving once it is back."""
    from gateway.core.catalog import Catalog
    from gateway.triton.process import TritonPorts, TritonProcess
    from harness.servers import MODEL_REPOSITORY, free_ports

    models = Catalog.from_repository(MODEL_REPOSITORY).triton_models
    triton = TritonProcess(
        MODEL_REPOSITORY, models, TritonPorts(*free_ports(3)), tmp_path / "triton", tmp_path / "triton" / "triton.log"
    )
    gateway = start_service(tmp_path / "gateway", extra_args=[f"--triton-url={triton.grpc_url}"], wait_healthy=False)
    try:
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(f"{gateway.http_url}/health", timeout=5)
        assert raised.value.code == 503
        await asyncio.to_thread(triton.start)
        print(f"[faults] external Triton started: gateway healthy {await resilience.wait_healthy(gateway, 10):.2f} s after")
        latencies = await resilience.probe_latencies(gateway.http_url, seconds=0.5)
        await asyncio.to_thread(triton.stop, 0)

        def unhealthy() -> bool:
            try:
                urllib.request.urlopen(f"{gateway.http_url}/health", timeout=5).close()
            except urllib.error.HTTPError as error:
                return error.code == 503
            return False

        await eventually(unhealthy, timeout_s=30, interval_s=0.1, what="the gateway to notice that its Triton is away")
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(f"{gateway.http_url}/health", timeout=5)
        assert raised.value.code == 503
        await asyncio.to_thread(triton.start)
        print(f"[faults] external Triton back: gateway healthy {await resilience.wait_healthy(gateway, 10):.2f} s after")
        latencies += await resilience.probe_latencies(gateway.http_url, seconds=0.5)
        assert latencies
    finally:
        gateway.stop()
        triton.stop()

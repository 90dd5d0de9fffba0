"""SIGTERM while Triton is stalled, against the real gateway and Triton: every HTTP request still in flight when the
shutdown grace period ends is answered 503 with Retry-After in its contract's shape, and nothing is logged with a
traceback (uvicorn's own answer would be a plain-text 500 and a traceback per request)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiohttp
import pytest

from bench import resilience
from harness.scrape import metric_sum
from harness.servers import start_service

pytestmark = pytest.mark.e2e

GRACE_S = 2.0
OPENAI = ("/v1/embeddings", {"model": resilience.MODEL, "input": "held by a stalled Triton"})
ALEPH_ALPHA = (
    "/semantic_embed",
    {"model": resilience.MODEL, "prompt": "held by a stalled Triton", "representation": "symmetric"},
)


@pytest.fixture
def stalled(tmp_path):
    service = start_service(tmp_path / "service", extra_args=["--triton-stall-restart-s=60", f"--shutdown-grace-s={GRACE_S}"])
    regions = resilience.shm_regions(service)
    pid = resilience.triton_pid(service)
    yield service, pid
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    service.stop()
    assert resilience.leftovers(service, regions) == []


async def in_flight(session: aiohttp.ClientSession, url: str) -> float:
    return await metric_sum(session, url, "embed_gateway_requests_in_flight", lambda labels: labels["contract"] != "ops")


async def test_requests_in_flight_at_the_end_of_the_grace_period_are_answered_503_in_their_shape(stalled):
    service, triton_pid = stalled
    os.kill(triton_pid, signal.SIGSTOP)
    calls = [OPENAI] * 4 + [ALEPH_ALPHA] * 4
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def post(path: str, body: dict):
            async with session.post(f"{service.http_url}{path}", json=body) as response:
                text = await response.text()
                is_json = response.headers.get("Content-Type") == "application/json"
                return path, response.status, response.headers, json.loads(text) if is_json else text

        requests = [asyncio.create_task(post(path, body)) for path, body in calls]
        # All eight wait in the gateway for Triton (the gauge is read from memory, however stalled Triton is).
        async with asyncio.timeout(30):
            while await in_flight(session, service.http_url) < len(calls):
                await asyncio.sleep(0.05)
        stopping = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        answers = await asyncio.gather(*requests)
        answered_s = time.monotonic() - stopping
    exit_code = await asyncio.to_thread(service.process.wait, 30)
    print(f"[shutdown] {len(answers)} requests answered {answered_s:.2f} s after SIGTERM (grace {GRACE_S:g} s); exit {exit_code}")

    assert GRACE_S - 0.5 < answered_s < GRACE_S + 3
    for path, status, headers, body in answers:
        assert status == 503, (path, status, body)
        assert int(headers["Retry-After"]) >= 1
        assert headers["Content-Type"] == "application/json"
        if path == "/v1/embeddings":
            assert body["error"]["code"] == "unavailable" and body["error"]["type"] == "service_unavailable"
            assert "shutting down" in body["error"]["message"]
        else:
            assert body["code"] == "UNAVAILABLE" and "shutting down" in body["error"]
        assert body["request_id"] if path != "/v1/embeddings" else body["error"]["request_id"]
    log = (service.run_dir / "gateway.log").read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-4000:]
    assert log.count("status=503") >= 1  # refusals are sampled in the access log (one line a second per route)

"""Floods of requests the gateway refuses, against the real gateway and Triton: refusing costs far less than serving.

- A retry storm of short deadlines (clients retrying every 50 ms after a 429, each request with X-Request-Timeout: 1)
  keeps most of the goodput that the same clients get when they honour Retry-After; before, refusals cost as much as
  parsing and queueing a request, and goodput collapsed to a tenth.
- An unauthenticated flood writes about one access line a second per route instead of one per request, and the
  metrics still count every refusal.

Bounded for a shared 2-core machine: a few seconds of load each; the thresholds leave room for its noise.
"""

from __future__ import annotations

import asyncio
import re
import resource
import time

import aiohttp
import pytest

from bench import resilience
from bench.retry_storm import measure
from harness.servers import start_service

pytestmark = pytest.mark.e2e


@pytest.fixture
def fresh(tmp_path, request):
    service = start_service(tmp_path / "service", extra_args=getattr(request, "param", []))
    yield service
    service.stop()


async def test_a_retry_storm_of_short_deadlines_keeps_most_of_the_goodput(fresh):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 500 client sockets or more in this process
    # A storm needs more callers than the service answers within their 1 s deadline, or nothing is refused. How many
    # depends on the machine: 500 overloaded the 2-core VMs this was written on, not one that answered 660 a second.
    # So the callers are one and a half times what a first short round served per second, and at least 500.
    probe = await measure(fresh.http_url, 500, None, warmup_s=2, seconds=2)
    clients = max(500, round(1.5 * probe["goodput"]))
    print(f"[retry storm] {clients} clients, from a first round's goodput of {probe['goodput']:.0f} a second")
    # Alternated, so that a change in what else runs on the machine weighs on both kinds of client alike.
    rounds = [await measure(fresh.http_url, clients, retry, warmup_s=3, seconds=4) for _ in range(2) for retry in (None, 0.05)]
    honour, storm = rounds[0::2], rounds[1::2]
    ratio = sum(r["goodput"] for r in storm) / sum(r["goodput"] for r in honour)
    for row in rounds:
        print(f"[retry storm] {row}")
    print(f"[retry storm] goodput of the storm / goodput honouring Retry-After: {ratio:.2f}")
    assert all(row["errors"] == 0 for row in rounds)
    assert all(s["refused_per_s"] > h["refused_per_s"] for s, h in zip(storm, honour))  # a storm: more refusals
    # Measured on this shared 2-core machine, 500 clients: 0.03 to 0.32 before refusals were made cheap, 0.40 to 1.12
    # after (the spread is what else runs on the machine meanwhile).
    assert ratio > 0.35, ratio


# An access line for a 401: one request's own (which may also count those not logged before it), or the count of an
# interval's refusals that were not logged one by one.
ACCESS_401 = re.compile(
    r"gateway\.access \[\w+\] (request|requests refused, not logged one by one) .*route=(\S+) status=401\b(?:.* suppressed=(\d+))?"
)


@pytest.mark.parametrize("fresh", [["--auth"]], indirect=True)
async def test_an_unauthenticated_flood_is_sampled_in_the_log_and_counted_exactly_in_the_metrics(fresh):
    routes = {
        "/v1/embeddings": {"model": resilience.MODEL, "input": "x"},
        "/semantic_embed": {"model": resilience.MODEL, "prompt": "x"},
    }
    sent = {route: 0 for route in routes}
    flood_s = 3.0
    log = fresh.run_dir / "gateway.log"
    log_before = log.stat().st_size
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer emb_not-a-token"}) as session:

        async def flood(route: str) -> None:
            end = time.monotonic() + flood_s
            while time.monotonic() < end:
                async with session.post(f"{fresh.http_url}{route}", json=routes[route]) as response:
                    await response.read()
                    assert response.status == 401
                sent[route] += 1

        await asyncio.gather(*(flood(route) for route in routes for _ in range(16)))

        def logged() -> dict[str, tuple[int, int]]:
            """Per route: access lines for 401, and the refusals they account for (themselves and those they count)."""
            found = {route: (0, 0) for route in routes}
            for kind, route, suppressed in ACCESS_401.findall(log.read_text()):
                lines, refusals = found[route]
                found[route] = (lines + 1, refusals + (kind == "request") + int(suppressed or 0))
            return found

        # The last interval's count is written when it ends (one second after it began).
        settle_by = time.monotonic() + 10
        while any(refusals != sent[route] for route, (_, refusals) in logged().items()) and time.monotonic() < settle_by:
            await asyncio.sleep(0.2)
        assert {route: refusals for route, (_, refusals) in logged().items()} == sent
        async with session.get(f"{fresh.http_url}/metrics") as response:
            metrics = await response.text()
    written = log.stat().st_size - log_before
    print(f"[flood] sent {sent} in {flood_s:g} s; access lines {logged()}; {written} bytes of log")
    for route, (lines, _) in logged().items():
        assert sent[route] > 200
        assert lines <= flood_s + 2, (route, lines)
    assert written < 4096
    for route, count in sent.items():
        contract = "openai" if route.startswith("/v1") else "aleph_alpha"
        assert f'embed_gateway_requests_total{{contract="{contract}",route="{route}",status="401"}} {float(count)}' in metrics
    assert f'embed_gateway_rejections_total{{reason="unauthenticated"}} {float(sum(sent.values()))}' in metrics

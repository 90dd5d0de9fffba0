"""Refusals in the access log, in the fast tier: at most one line a second per (contract, route, status), with the
count of those not logged one by one, while the Prometheus metrics count every request. A flood against the real
gateway: tests/test_refusal_floods_e2e.py."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from gateway.ops.logs import AccessLog, configure_logging
from gateway.ops.metrics import Metrics
from gateway.ops.request_context import RequestContext
from gateway.transports.policy import RequestPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines(restore_logging):
    """The access lines written, as JSON objects (read when called)."""
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    return lambda: [line for line in map(json.loads, stream.getvalue().splitlines()) if line["logger"] == "gateway.access"]


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def refused(route: str = "/v1/embeddings", contract: str = "openai", request_id: str = "r") -> RequestContext:
    return RequestContext(request_id, contract, route)


def test_a_flood_of_refusals_writes_one_line_a_second_and_counts_the_rest(lines):
    clock = Clock()
    log = AccessLog(clock=clock)
    for i in range(1000):  # one second of a flood, no event loop: no timer, the next line carries the count
        log.write(refused(request_id=f"r{i}"), "401")
        clock.now += 0.000999
    assert [(line["request_id"], line["status"]) for line in lines()] == [("r0", "401")]
    clock.now += 0.01
    log.write(refused(request_id="next"), "401")
    first, second = lines()
    assert "suppressed" not in first
    assert (second["request_id"], second["suppressed"]) == ("next", 999)


def test_each_status_and_route_has_its_own_interval_and_other_statuses_are_all_logged(lines):
    clock = Clock()
    log = AccessLog(clock=clock)
    for _ in range(3):
        log.write(refused("/v1/embeddings"), "401")
        log.write(refused("/v1/embeddings"), "429")
        log.write(refused("/embed", "aleph_alpha"), "429")
        log.write(refused("/v1/embeddings"), "200")
        log.write(refused("/v1/embeddings"), "400")
        log.write(refused("other", "grpc"), "UNAUTHENTICATED")
        log.write(refused("other", "grpc"), "INVALID_ARGUMENT")
    logged = [(line["route"], line["status"]) for line in lines()]
    once = [("/v1/embeddings", "401"), ("/v1/embeddings", "429"), ("/embed", "429"), ("other", "UNAUTHENTICATED")]
    every_time = [("/v1/embeddings", "200"), ("/v1/embeddings", "400"), ("other", "INVALID_ARGUMENT")]
    assert sorted(logged) == sorted(once + every_time * 3)


async def test_the_count_is_written_when_the_interval_ends_and_each_interval_has_its_own(lines):
    # A route of this test's own: other tests' access logs share the event loop, and their timers may still fire.
    route = "/sampling-test"
    summaries = asyncio.Queue()

    class Summaries(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fields = getattr(record, "fields", None) or {}
            if fields.get("route") == route and "suppressed" in fields:
                summaries.put_nowait(fields)

    handler = Summaries()
    logging.getLogger("gateway.access").addHandler(handler)
    try:
        log = AccessLog(interval_s=0.5)  # the writes after the first summary land in the interval it opens
        for _ in range(40):
            log.write(refused(route), "429")
        fields = await asyncio.wait_for(summaries.get(), 5)
        assert (fields["status"], fields["suppressed"]) == ("429", 39)
        # The flood goes on: still one line an interval, each with its own count.
        for _ in range(10):
            log.write(refused(route), "429")
        assert (await asyncio.wait_for(summaries.get(), 5))["suppressed"] == 10
    finally:
        logging.getLogger("gateway.access").removeHandler(handler)
    written = [line for line in lines() if line["route"] == route]
    assert [line["message"] for line in written] == ["request"] + ["requests refused, not logged one by one"] * 2
    assert sum(line.get("suppressed", 1) for line in written) == 50  # every refusal is in the log, one way or the other


def test_metrics_count_every_refusal_the_log_samples(lines):
    metrics = Metrics()
    policy = RequestPolicy(None, metrics)
    for i in range(500):
        context = RequestContext(f"r{i}", "openai", "/v1/embeddings")
        metrics.request_started(context)
        policy.finish(context, "401", None)
    assert len([line for line in lines() if line["status"] == "401"]) == 1
    assert (
        metrics.registry.get_sample_value(
            "embed_gateway_requests_total", {"contract": "openai", "route": "/v1/embeddings", "status": "401"}
        )
        == 500
    )
    assert metrics.registry.get_sample_value("embed_gateway_rejections_total", {"reason": "unauthenticated"}) == 500

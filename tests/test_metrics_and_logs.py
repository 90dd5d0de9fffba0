"""gateway.ops.metrics and gateway.ops.logs on their own (fast), and one scrape of the metrics by a real Prometheus."""

from __future__ import annotations

import http.server
import io
import json
import logging
import os
import re
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.ops.logs import QUIET_LOGGERS, configure_logging, log_access
from gateway.ops.metrics import REJECTION_REASONS, Metrics, reason_for_status
from gateway.ops.request_context import RequestContext, bind, unbind
from harness.prometheus_server import PrometheusServer


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition, by name and sorted labels, parsed as Prometheus would."""
    body, content_type = metrics.render(None)
    assert content_type.startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def context(contract: str, route: str, token_id: int | None = None, texts: int = 0, tokens: int = 0, **times: float):
    # Started 50 ms ago, so that the duration falls in a known bucket.
    started = RequestContext("r", contract, route, started=time.monotonic() - 0.05, token_id=token_id, **times)
    started.add_usage(texts, tokens)
    return started


def test_requests_usage_and_rejections_are_counted():
    metrics = Metrics(max_token_labels=2)
    finished = [
        (context("openai", "/v1/embeddings", 1, texts=2, tokens=10, queue_s=0.002, triton_s=0.02), "200", None),
        (context("openai", "/v1/embeddings", 2, texts=3, tokens=7, triton_s=0.03), "200", None),
        (context("aleph_alpha", "/semantic_embed", 3, texts=1, tokens=4), "200", None),
        (context("openai", "/v1/embeddings", 3), "429", "rate_limited"),
        (context("grpc", "/embedding.v1.EmbeddingService/Embed"), "UNAUTHENTICATED", "unauthenticated"),
        (context("openai", "/v1/embeddings"), "413", None),
        (context("openai", "/v1/embeddings"), "429", None),
    ]
    for request, _, _ in finished:
        metrics.request_started(request)
    during = samples(metrics)
    assert value(during, "embed_gateway_requests_in_flight", contract="openai") == 5
    assert value(during, "embed_gateway_requests_in_flight", contract="grpc") == 1
    for request, status, rejection in finished:
        metrics.request_finished(request, status, rejection)

    found = samples(metrics)
    for contract in ("openai", "aleph_alpha", "grpc"):
        assert value(found, "embed_gateway_requests_in_flight", contract=contract) == 0
    assert value(found, "embed_gateway_requests_total", contract="openai", route="/v1/embeddings", status="200") == 2
    assert value(found, "embed_gateway_requests_total", contract="openai", route="/v1/embeddings", status="429") == 2
    assert value(found, "embed_gateway_requests_total", contract="aleph_alpha", route="/semantic_embed", status="200") == 1
    assert (
        value(
            found,
            "embed_gateway_requests_total",
            contract="grpc",
            route="/embedding.v1.EmbeddingService/Embed",
            status="UNAUTHENTICATED",
        )
        == 1
    )
    expected_rejections = {"rate_limited": 1, "unauthenticated": 1, "too_large": 1, "overloaded": 1}
    for reason in REJECTION_REASONS:
        assert value(found, "embed_gateway_rejections_total", reason=reason) == expected_rejections.get(reason, 0), reason

    assert value(found, "embed_gateway_texts_total", contract="openai") == 5
    assert value(found, "embed_gateway_prompt_tokens_total", contract="openai") == 17
    assert value(found, "embed_gateway_texts_total", contract="aleph_alpha") == 1

    # 50 ms each: none by 25 ms, all by 100 ms.
    openai = {"contract": "openai", "route": "/v1/embeddings"}
    assert value(found, "embed_gateway_request_duration_seconds_count", **openai) == 5
    assert value(found, "embed_gateway_request_duration_seconds_bucket", le="0.025", **openai) == 0
    assert value(found, "embed_gateway_request_duration_seconds_bucket", le="0.1", **openai) == 5
    # Only requests that reached the scheduler or Triton are observed there.
    assert value(found, "embed_gateway_queue_duration_seconds_count") == 1
    assert value(found, "embed_gateway_queue_duration_seconds_sum") == pytest.approx(0.002)
    assert value(found, "embed_gateway_triton_duration_seconds_count") == 2
    assert value(found, "embed_gateway_triton_duration_seconds_sum") == pytest.approx(0.05)


def test_token_labels_are_bounded_and_the_rest_add_up_under_other():
    metrics = Metrics(max_token_labels=2)
    for token_id, texts, tokens in ((1, 2, 10), (2, 3, 7), (3, 1, 4), (1, 1, 1), (4, 5, 6), (2, 0, 0)):
        request = context("openai", "/v1/embeddings", token_id, texts=texts, tokens=tokens)
        metrics.request_started(request)
        metrics.request_finished(request, "200")
    found = samples(metrics)
    token_labels = {dict(labels)["token_id"] for name, labels in found if name == "embed_gateway_token_requests_total"}
    assert token_labels == {"1", "2", "other"}
    assert [value(found, "embed_gateway_token_requests_total", token_id=t) for t in ("1", "2", "other")] == [2, 2, 2]
    assert [value(found, "embed_gateway_token_texts_total", token_id=t) for t in ("1", "2", "other")] == [3, 3, 6]
    assert [value(found, "embed_gateway_token_prompt_tokens_total", token_id=t) for t in ("1", "2", "other")] == [11, 7, 10]
    assert sum(value(found, "embed_gateway_token_texts_total", token_id=t) for t in token_labels) == value(
        found, "embed_gateway_texts_total", contract="openai"
    )


def test_scheduler_and_triton_are_read_at_each_scrape():
    metrics = Metrics()
    state = {"rows": 3.0, "pending": 17.0, "ready": 2}
    metrics.watch_scheduler(lambda: state["rows"], lambda: state["pending"])
    metrics.watch_triton(lambda: state["ready"], lambda: 3)
    found = samples(metrics)
    assert (value(found, "embed_gateway_rows_in_flight"), value(found, "embed_gateway_pending_texts")) == (3, 17)
    assert value(found, "embed_gateway_triton_up") == 1
    assert value(found, "embed_gateway_triton_endpoints", state="ready") == 2
    assert value(found, "embed_gateway_triton_endpoints", state="unready") == 1
    state.update(rows=0.0, pending=2.0, ready=0)
    metrics.triton_restarted()
    metrics.triton_restarted()
    found = samples(metrics)
    assert (value(found, "embed_gateway_rows_in_flight"), value(found, "embed_gateway_pending_texts")) == (0, 2)
    assert value(found, "embed_gateway_triton_up") == 0
    assert value(found, "embed_gateway_triton_endpoints", state="unready") == 3
    assert value(found, "embed_gateway_triton_restarts_total") == 2


# One --workers process: records into the shared directory, copies its gauges in, and (when asked) renders /metrics.
_WORKER = """
import sys
from pathlib import Path
from gateway.ops.metrics import Metrics, forget_process, share_between_processes

share_between_processes(Path(sys.argv[1]))
metrics = Metrics(shared=True)
metrics.requests.labels("openai", "/v1/embeddings", "200").inc(int(sys.argv[2]))
metrics.in_flight.labels("openai").inc(int(sys.argv[3]))
metrics.watch_scheduler(lambda: 5, lambda: 7)
metrics.watch_triton(lambda: 1, lambda: 1)
metrics.refresh_shared_gauges()
if len(sys.argv) > 4:
    forget_process(int(sys.argv[4]))
    sys.stdout.write(metrics.render(None)[0].decode())
"""


def test_the_metrics_of_a_hosts_workers_add_up_in_whichever_renders_them(tmp_path):
    import subprocess
    import sys

    def worker(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-c", _WORKER, str(tmp_path), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done

    first = subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path), "3", "2"])
    assert first.wait(timeout=60) == 0
    worker("4", "1")
    # The third counts all three, bar the live gauges of the first, which its parent said has exited.
    families = {f.name: f for f in text_string_to_metric_families(worker("5", "0", str(first.pid)).stdout)}
    (requests,) = families["embed_gateway_requests"].samples[:1]
    assert requests.value == 3 + 4 + 5
    assert families["embed_gateway_requests_in_flight"].samples[0].value == 1 + 0  # livesum of the two still counted
    assert families["embed_gateway_pending_texts"].samples[0].value == 7 * 2
    assert families["embed_gateway_triton_up"].samples[0].value == 1  # livemax, not a sum


@pytest.mark.parametrize(
    "status, rate_limited, reason",
    [
        (200, False, None),
        (204, False, None),
        (400, False, "invalid"),
        (404, False, "invalid"),
        (405, False, "invalid"),
        (415, False, "invalid"),
        (422, False, "invalid"),
        (401, False, "unauthenticated"),
        (403, False, "forbidden"),
        (413, False, "too_large"),
        (429, False, "overloaded"),
        (429, True, "rate_limited"),
        (503, False, "unavailable"),
        (504, False, "deadline_exceeded"),
        (500, False, None),
    ],
)
def test_reason_for_status(status, rate_limited, reason):
    assert reason_for_status(status, rate_limited) == reason


def test_an_unknown_rejection_reason_is_refused():
    with pytest.raises(ValueError, match="unknown rejection reason 'nope'"):
        Metrics().request_finished(context("openai", "/v1/embeddings"), "400", "nope")


def test_render_speaks_openmetrics_when_asked():
    body, content_type = Metrics().render("application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


@pytest.fixture
def restore_logging():
    """configure_logging changes process-wide state; later tests (and pytest's capture) get it back as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    access_disabled = logging.getLogger("uvicorn.access").disabled
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)
    logging.getLogger("uvicorn.access").disabled = access_disabled


def served_request() -> RequestContext:
    request = RequestContext("req-42", "openai", "/v1/embeddings", started=time.monotonic() - 0.0123, token_id=7)
    request.add_usage(2, 11)
    return request


def test_json_lines_name_the_request_and_carry_fields_and_tracebacks(restore_logging):
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    request = served_request()
    bound = bind(request)
    try:
        logging.getLogger("some.library").warning(
            "hello %s", "world", extra={"route": "/v1/embeddings", "secret": "not allow-listed", "fields": {"attempt": 2}}
        )
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            logging.getLogger("gateway.core").exception("failed")
        logging.getLogger("gateway.core").info("explicit", extra={"request_id": "other-id"})
        log_access(request, "200")
    finally:
        unbind(bound)
    logging.getLogger("gateway").info("outside")

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["hello world", "failed", "explicit", "request", "outside"]
    assert [line.get("request_id") for line in lines] == ["req-42", "req-42", "other-id", "req-42", None]
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"]), line["ts"]
    hello, failed, _, access, outside = lines
    assert hello == {
        "ts": hello["ts"],
        "level": "WARNING",
        "logger": "some.library",
        "message": "hello world",
        "request_id": "req-42",
        "route": "/v1/embeddings",
        "attempt": 2,
    }
    assert failed["level"] == "ERROR"
    assert failed["exc_info"].startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError: division by zero" in failed["exc_info"]
    # Counts and ids only: no key that could hold a text or a credential.
    fields = {"contract", "route", "status", "texts", "tokens", "ms", "token_id"}
    assert set(access) == {"ts", "level", "logger", "message", "request_id"} | fields
    assert access["logger"] == "gateway.access"
    assert (access["contract"], access["route"], access["status"]) == ("openai", "/v1/embeddings", "200")
    assert (access["texts"], access["tokens"], access["token_id"]) == (2, 11, 7)
    assert 12.3 <= access["ms"] < 1000 and round(access["ms"], 1) == access["ms"]
    assert "request_id" not in outside


def test_text_lines_name_the_request_in_brackets(restore_logging):
    stream = io.StringIO()
    configure_logging("INFO", "text", stream)
    configure_logging("INFO", "text", stream)  # a second call replaces the first: each record is written once
    request = served_request()
    bound = bind(request)
    try:
        logging.getLogger("gateway.core").info("working", extra={"fields": {"note": "two words"}})
        log_access(request, "429")
    finally:
        unbind(bound)
    logging.getLogger("gateway").debug("not at INFO")
    logging.getLogger("gateway").info("outside")

    working, access, outside = stream.getvalue().splitlines()
    assert working.endswith(' INFO gateway.core [req-42] working note="two words"')
    assert re.search(
        r" INFO gateway\.access \[req-42\] request contract=openai route=/v1/embeddings status=429 texts=2 tokens=11 "
        r"ms=\d+\.?\d* token_id=7$",
        access,
    ), access
    assert outside.endswith(" INFO gateway [-] outside")


def test_third_party_loggers_are_quieted(restore_logging):
    configure_logging("DEBUG", "text", io.StringIO())
    assert logging.getLogger("uvicorn.error").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("uvicorn.access").disabled
    assert logging.getLogger("gateway").getEffectiveLevel() == logging.DEBUG
    configure_logging("ERROR", "text", io.StringIO())
    assert logging.getLogger("uvicorn.error").getEffectiveLevel() == logging.ERROR


@pytest.mark.parametrize(
    "level, fmt, message", [("LOUD", "text", "unknown log level 'LOUD'"), ("INFO", "xml", "unknown log format 'xml'")]
)
def test_invalid_level_or_format_is_a_value_error(restore_logging, level, fmt, message):
    with pytest.raises(ValueError, match=message):
        configure_logging(level, fmt, io.StringIO())


class Exporter(http.server.ThreadingHTTPServer):
    """GET /metrics answered with Metrics.render(), as the gateway does, behind a bearer token."""

    def __init__(self, metrics: Metrics, token: str):
        self.metrics = metrics
        self.token = token
        self.accept_headers: list[str] = []
        super().__init__(("127.0.0.1", 0), ExporterHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class ExporterHandler(http.server.BaseHTTPRequestHandler):
    server: Exporter

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            self.send_error(401)
            return
        self.server.accept_headers.append(self.headers.get("Accept", ""))
        body, content_type = self.server.metrics.render(self.headers.get("Accept"))
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass  # one line per scrape would drown the test output


@pytest.mark.e2e
def test_a_real_prometheus_scrapes_what_was_recorded():
    metrics = Metrics()
    metrics.watch_triton(lambda: 1, lambda: 1)
    for status in ("200", "200", "200", "429", "401"):
        request = context("openai", "/v1/embeddings", token_id=5, texts=2, tokens=9)
        metrics.request_started(request)
        metrics.request_finished(request, status)
    exporter = Exporter(metrics, token="s3cret")
    try:
        target = f"127.0.0.1:{exporter.server_port}"
        with PrometheusServer({"gateway": [target]}, bearer_tokens={"gateway": "s3cret"}) as prometheus:
            pid = prometheus.process.pid
            # The first scrape comes a few seconds after the start: Prometheus passes on discovered targets every 5 s.
            prometheus.wait_for("sum(embed_gateway_requests_total)", lambda result: result and result[0]["value"][1] == "5")
            assert prometheus.query('embed_gateway_rejections_total{reason="overloaded"}')[0]["value"][1] == "1"
            assert prometheus.query('embed_gateway_rejections_total{reason="unauthenticated"}')[0]["value"][1] == "1"
            assert prometheus.query('embed_gateway_token_texts_total{token_id="5"}')[0]["value"][1] == "10"
            assert prometheus.query("embed_gateway_triton_up")[0]["value"][1] == "1"
            (scraped,) = prometheus.targets()
            assert (scraped["labels"]["job"], scraped["labels"]["instance"], scraped["health"]) == ("gateway", target, "up")
        assert exporter.accept_headers and "application/openmetrics-text" in exporter.accept_headers[0]
        # Stopped with its process group: nothing of it is left.
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
        assert prometheus.directory is None
    finally:
        exporter.shutdown()
        exporter.server_close()

"""The gateway's Prometheus metrics: what each request cost, what was refused and why, and how the scheduler
and Triton are doing, exposed at GET /metrics.

Each Metrics owns its own CollectorRegistry rather than prometheus_client's global one, so that several can live
in one process (tests, or two gateways) without "Duplicated timeseries" errors, and /metrics shows only these.

With --workers N the gateway's processes share one directory of metric files (prometheus_client's multiprocess mode,
see share_between_processes): each records into its own file, and /metrics, whichever worker answers it, reads them
all, so it reports the whole host. Counters and histograms add up; the gauges say how they combine (in flight:
summed over the live workers; Triton up: the most any worker sees).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.exposition import choose_encoder

from gateway.ops.request_context import RequestContext

NAMESPACE = "embed_gateway"

# From a 1 ms cache-warm call to the 60 s a request may wait at most; roughly x2.5 per step keeps the series few.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REJECTION_REASONS = (
    "overloaded",
    "rate_limited",
    "unauthenticated",
    "forbidden",
    "invalid",
    "unavailable",
    "deadline_exceeded",
    "too_large",
)

_REASON_BY_STATUS = {
    400: "invalid",
    401: "unauthenticated",
    403: "forbidden",
    404: "invalid",
    405: "invalid",
    408: "invalid",
    413: "too_large",
    415: "invalid",
    422: "invalid",
    429: "overloaded",
    431: "too_large",
    501: "invalid",
    503: "unavailable",
    504: "deadline_exceeded",
    505: "invalid",
}

# The route label of requests the HTTP server answered before any route could be matched (malformed, headers too
# slow or too large).
UNPARSED_ROUTE = "unparsed"

CACHE_RESULTS = ("hit", "miss", "unavailable")
CACHE_WRITE_RESULTS = ("stored", "failed", "skipped")

# Token ids beyond the bound share this label value.
OTHER_TOKENS = "other"


# prometheus_client's own switch: set, every metric created after it records into a file in that directory.
SHARED_DIRECTORY_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How often a worker copies its scheduler's and Triton's state into its gauges' files, which a scrape then reads.
SHARED_GAUGE_PERIOD_S = 1.0


def share_between_processes(directory: Path) -> None:
    """Makes every metric created from now on in this process (and in the processes it starts, through the
    environment) record into `directory`, for a Metrics(shared=True) to report all of them."""
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[SHARED_DIRECTORY_ENV] = str(directory)
    # prometheus_client picks its value class when first imported; a process that learns of the directory later
    # switches it here, before it creates any metric.
    values.ValueClass = values.MultiProcessValue()


def forget_process(pid: int) -> None:
    """A worker that exited: its live gauges stop counting (its counters and histograms stay in the totals)."""
    multiprocess.mark_process_dead(pid)


def reason_for_status(status: int, rate_limited: bool = False) -> str | None:
    """The rejection an HTTP status stands for, or None when it is no rejection (2xx, or an error of the gateway's own).

    429 means the gateway was overloaded unless the caller says it was the caller's rate limit: the status alone
    cannot tell the two apart.
    """
    if status == 429 and rate_limited:
        return "rate_limited"
    return _REASON_BY_STATUS.get(status)


class Metrics:
    def __init__(self, max_token_labels: int = 100, shared: bool = False) -> None:
        """shared: this process is one of several whose metrics share the directory share_between_processes set."""
        self.registry = CollectorRegistry()
        self.shared = shared
        # In shared mode a gauge cannot be read at scrape time from another process: each one's state is copied into
        # its file every SHARED_GAUGE_PERIOD_S by refresh_shared_gauges instead.
        self._watched: list[tuple[Gauge, Callable[[], float]]] = []
        self.requests = self._counter("requests_total", "Requests answered", "contract", "route", "status")
        self.request_duration = self._histogram("request_duration_seconds", "Time from arrival to answer", "contract", "route")
        # No contract label: the scheduler batches the texts of all contracts together, so their waits do not differ.
        self.queue_duration = self._histogram(
            "queue_duration_seconds", "Time a request's chunks waited in the gateway's scheduler before going to Triton"
        )
        self.triton_duration = self._histogram("triton_duration_seconds", "Time a request spent in Triton calls")
        self.texts = self._counter("texts_total", "Texts embedded", "contract")
        self.prompt_tokens = self._counter("prompt_tokens_total", "Tokens of the texts embedded", "contract")
        self.in_flight = self._gauge("requests_in_flight", "Requests being served", "contract", combine="livesum")
        self.rows_in_flight = self._gauge("rows_in_flight", "Rows sent to Triton and not answered yet", combine="livesum")
        self.pending_texts = self._gauge("pending_texts", "Texts waiting in the scheduler", combine="livesum")
        self.rejections = self._counter("rejections_total", "Requests refused, by reason", "reason")
        # Every reason is exported from the start, at 0: rate() and alerts over a series that appears only with
        # the first rejection would miss that first increase.
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        self.triton_up = self._gauge("triton_up", "1 when a Triton is ready to serve, else 0", combine="livemax")
        self.triton_endpoints = self._gauge(
            "triton_endpoints", "Tritons the gateway knows of, by readiness", "state", combine="livemax"
        )
        self.triton_restarts = self._counter("triton_restarts_total", "Times the gateway restarted Triton")
        self.token_requests = self._counter("token_requests_total", "Requests by API token", "token_id")
        self.token_texts = self._counter("token_texts_total", "Texts embedded by API token", "token_id")
        self.token_prompt_tokens = self._counter("token_prompt_tokens_total", "Prompt tokens by API token", "token_id")
        # Each label value is a time series that Prometheus keeps in memory and on disk, and token ids only grow
        # as tokens are created: unbounded, they would let the metrics outgrow the monitoring. The first
        # max_token_labels tokens seen get their own series; later ones add up under token_id="other". Exact
        # usage per token belongs in the token store, not here.
        self._max_token_labels = max_token_labels
        self._token_labels: set[str] = set()
        # Requests finish on the event loop, but gRPC or a test may record from other threads.
        self._token_labels_lock = threading.Lock()
        # Bounded like the labels they hold: contracts, route templates and status codes.
        self._contract_children: dict[str, tuple] = {}
        self._route_children: dict[tuple[str, str, str], tuple] = {}

    def _counter(self, name: str, documentation: str, *labels: str) -> Counter:
        return Counter(name, documentation, labels, namespace=NAMESPACE, registry=self.registry)

    def _gauge(self, name: str, documentation: str, *labels: str, combine: str) -> Gauge:
        """combine: how the workers' values add up in shared mode (prometheus_client's multiprocess_mode)."""
        return Gauge(name, documentation, labels, namespace=NAMESPACE, registry=self.registry, multiprocess_mode=combine)  # type: ignore[arg-type]

    def _watch(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """The gauge shows read(): at each scrape, or in shared mode as of the last refresh."""
        if self.shared:
            self._watched.append((gauge, read))
        else:
            gauge.set_function(read)

    def refresh_shared_gauges(self) -> None:
        for gauge, read in self._watched:
            gauge.set(read())

    async def keep_shared_gauges(self) -> None:
        """In shared mode, for as long as the worker serves."""
        while True:
            self.refresh_shared_gauges()
            await asyncio.sleep(SHARED_GAUGE_PERIOD_S)

    def _histogram(self, name: str, documentation: str, *labels: str) -> Histogram:
        return Histogram(name, documentation, labels, namespace=NAMESPACE, registry=self.registry, buckets=DURATION_BUCKETS)

    def watch_scheduler(self, rows_in_flight: Callable[[], float], pending_texts: Callable[[], float]) -> None:
        """Read the scheduler's state at each scrape; the callbacks run on the scraping request, so must be cheap."""
        self._watch(self.rows_in_flight, rows_in_flight)
        self._watch(self.pending_texts, pending_texts)

    def watch_triton(self, ready: Callable[[], int], known: Callable[[], int]) -> None:
        """Read at each scrape: ready() counts the Tritons ready now, known() all of them. Both must be cached
        counts, not calls to Triton."""
        self._watch(self.triton_up, lambda: 1.0 if ready() else 0.0)
        self._watch(self.triton_endpoints.labels("ready"), ready)
        self._watch(self.triton_endpoints.labels("unready"), lambda: known() - ready())

    def watch_cache(self, up: Callable[[], bool]) -> None:
        """The embedding cache's series, which exist only when there is a cache: a cache_up of 0 must mean it is down."""
        self.cache_texts = self._counter("cache_texts_total", "Texts looked up in the embedding cache, by result", "result")
        self.cache_tokens_saved = self._counter("cache_tokens_saved_total", "Tokens that cache hits spared the encoder")
        self.cache_writes = self._counter("cache_writes_total", "Embeddings written to the cache, by result", "result")
        self.cache_up = self._gauge(
            "cache_up", "1 while the embedding cache answers, else 0 (requests then skip it)", combine="livemin"
        )
        for result in CACHE_RESULTS:
            self.cache_texts.labels(result)
        for result in CACHE_WRITE_RESULTS:
            self.cache_writes.labels(result)
        self._watch(self.cache_up, lambda: 1.0 if up() else 0.0)

    def cache_looked_up(self, result: str, texts: int, tokens_saved: int = 0) -> None:
        self.cache_texts.labels(result).inc(texts)
        self.cache_tokens_saved.inc(tokens_saved)

    def cache_written(self, result: str, texts: int) -> None:
        self.cache_writes.labels(result).inc(texts)

    def triton_restarted(self) -> None:
        self.triton_restarts.inc()

    def _of_contract(self, contract: str) -> tuple:
        """The contract's labelled children (in flight, texts, tokens): labels() costs microseconds a call, and the
        label values are few, so each is looked up once."""
        children = self._contract_children.get(contract)
        if children is None:
            children = (self.in_flight.labels(contract), self.texts.labels(contract), self.prompt_tokens.labels(contract))
            self._contract_children[contract] = children
        return children

    def _of_route(self, contract: str, route: str, status: str) -> tuple:
        key = (contract, route, status)
        children = self._route_children.get(key)
        if children is None:
            children = (self.requests.labels(contract, route, status), self.request_duration.labels(contract, route))
            self._route_children[key] = children
        return children

    def request_started(self, context: RequestContext) -> None:
        self._of_contract(context.contract)[0].inc()

    def request_finished(self, context: RequestContext, status: str, rejection: str | None = None) -> None:
        """Record a request that request_started saw. The rejection is derived from a numeric (HTTP) status when
        not given; a gRPC status name says too little (RESOURCE_EXHAUSTED: overloaded or too large?), so gRPC
        callers pass it."""
        if rejection is None and status.isdigit():
            rejection = reason_for_status(int(status))
        if rejection is not None and rejection not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {rejection!r}; expected one of {', '.join(REJECTION_REASONS)}")
        in_flight, texts, tokens = self._of_contract(context.contract)
        requests, duration = self._of_route(context.contract, context.route, status)
        in_flight.dec()
        requests.inc()
        duration.observe(context.elapsed_s())
        if rejection is not None:
            self.rejections.labels(rejection).inc()
        # Requests that never reached the scheduler or Triton (refused, or not an embedding) would only pile up
        # in the lowest bucket and hide the waits of those that did.
        if context.queue_s > 0:
            self.queue_duration.observe(context.queue_s)
        if context.triton_s > 0:
            self.triton_duration.observe(context.triton_s)
        texts.inc(context.texts)
        tokens.inc(context.tokens)
        if context.token_id is not None:
            token = self._token_label(context.token_id)
            self.token_requests.labels(token).inc()
            self.token_texts.labels(token).inc(context.texts)
            self.token_prompt_tokens.labels(token).inc(context.tokens)

    def request_refused_unparsed(self, contract: str, status: int) -> None:
        """A request the HTTP server refused before the app saw it: counted in requests_total (route "unparsed") and
        rejections_total like any other, with no duration (its clock never started) and never in flight."""
        self.requests.labels(contract, UNPARSED_ROUTE, str(status)).inc()
        reason = reason_for_status(status)
        if reason is not None:
            self.rejections.labels(reason).inc()

    def _token_label(self, token_id: int) -> str:
        label = str(token_id)
        with self._token_labels_lock:
            if label in self._token_labels:
                return label
            if len(self._token_labels) < self._max_token_labels:
                self._token_labels.add(label)
                return label
        return OTHER_TOKENS

    def render(self, accept_header: str | None) -> tuple[bytes, str]:
        """The exposition body and its content type, in the format the scraper asked for (OpenMetrics or text)."""
        encoder, content_type = choose_encoder(accept_header or "")
        if not self.shared:
            return encoder(self.registry), content_type
        # Every process's files, this one's included: the whole host.
        host = CollectorRegistry()
        multiprocess.MultiProcessCollector(host)
        return encoder(host), content_type

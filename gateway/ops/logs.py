"""The gateway's logging: one handler on the root logger, text or JSON lines, every line of a request naming its id,
and one access line per request (refusals sampled, see AccessLog).

Logs go to a stream (stdout by default), never to a file of the gateway's own: a file would grow without bound
unless the gateway also rotated it. The process supervisor (systemd's journald, Docker, Kubernetes) collects the
stream and rotates it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import orjson

from gateway.ops import request_context
from gateway.ops.request_context import RequestContext

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

ACCESS_LOG = logging.getLogger("gateway.access")

# The `extra` keys a log call may add to a line. `extra` sets attributes on the record, so without an allow-list
# anything put there (a request body, a header) would be written out; other fields go in extra={"fields": {...}},
# where writing them is the evident intent of the call.
EXTRA_FIELDS = ("contract", "route", "status", "texts", "tokens", "ms", "token_id", "model", "reason")

# Their INFO lines repeat what the gateway logs itself; their warnings still show.
QUIET_LOGGERS = ("uvicorn", "uvicorn.error", "grpc", "asyncio", "urllib3", "httpx", "httpcore", "psycopg")


class RequestIdFilter(logging.Filter):
    """Puts the id of the request being served on each record, whichever logger made it.

    On the handler rather than on a logger: a logger's filters see only records logged through that very logger,
    not those propagating from its children. A record given a request_id of its own (extra=...) keeps it.
    Outside a request the record gets none: the text format shows "-", the JSON format leaves the field out.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        context = request_context.current()
        if context is not None and not hasattr(record, "request_id"):
            record.request_id = context.request_id
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a record carries: allow-listed `extra` keys, then those of extra={"fields": {...}}."""
    fields = {key: record.__dict__[key] for key in EXTRA_FIELDS if key in record.__dict__}
    fields.update(getattr(record, "fields", None) or {})
    return fields


_NEEDS_QUOTES = re.compile(r'[\s"=]')


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    # Quoted when a reader could not tell where it ends; json quoting escapes quotes and newlines too.
    if not text or _NEEDS_QUOTES.search(text):
        return orjson.dumps(text).decode()
    return text


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, defaults={"request_id": "-"})

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, so that log collectors need no parsing rules."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if hasattr(record, "request_id"):
            entry["request_id"] = record.request_id
        for key, value in _fields(record).items():
            entry.setdefault(key, value)  # a field cannot pass itself off as the time, level or message
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        # default=str: a value orjson cannot serialize (a Path, an exception) is written as its text, not lost with the line.
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every logger's records at `level` and above to `stream` (sys.stdout when None, looked up at the call
    so that a replaced sys.stdout is honoured) in `fmt`. Calling it again replaces the previous configuration."""
    name = level.upper()
    if name not in LEVELS:
        raise ValueError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    # Replacing rather than adding makes a second call reconfigure instead of doubling every line.
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(name)
    _quiet_third_parties(logging.getLevelName(name))


def _quiet_third_parties(level: int) -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    # Our access line replaces uvicorn's, which would name neither the request id nor the contract.
    logging.getLogger("uvicorn.access").disabled = True


def log_access(context: RequestContext, status: str, suppressed: int = 0) -> None:
    """The one line a request leaves behind. It names the caller's token by id only, and counts texts: neither the
    bearer token nor any text may ever reach a log. `suppressed`: refusals like it that AccessLog did not log one by
    one just before it."""
    fields = {
        "contract": context.contract,
        "route": context.route,
        "status": status,
        "texts": context.texts,
        "tokens": context.tokens,
        "ms": round(context.elapsed_s() * 1000, 1),
        "token_id": context.token_id,
    }
    if context.error_kind is not None:
        fields["error"] = context.error_kind
    if suppressed:
        fields["suppressed"] = suppressed
    ACCESS_LOG.info("request", extra={"request_id": context.request_id, "fields": fields})


# Refusals that a flood or a retry storm brings by the thousand a second, each saying nothing the next one does not:
# an unauthenticated flood wrote 1.1 MB/s of access lines. HTTP statuses and gRPC status names.
SAMPLED_STATUSES = frozenset(
    {"401", "403", "429", "503", "UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}
)
SAMPLE_INTERVAL_S = 1.0


@dataclass
class _Window:
    ends: float
    suppressed: int = 0
    flush: asyncio.TimerHandle | None = None


class AccessLog:
    """Writes each request's access line, but for a refusal (SAMPLED_STATUSES) at most one line per `interval_s` and
    (contract, route, status): the first refusal after a quiet interval is logged as any request is, the others of
    its interval are counted, and when the interval ends one line says how many were not logged one by one (then a
    new interval starts, so a flood that goes on writes one line a second). The Prometheus metrics count every
    request; this only spares the log.

    The summary is written by a timer on the running event loop. Without one (a caller on another thread), the
    count waits for the next refusal of its kind, whose line carries it.
    """

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self._windows: dict[tuple[str, str, str], _Window] = {}
        # Requests finish on the event loop, but gRPC or a test may log from other threads.
        self._lock = threading.Lock()

    def write(self, context: RequestContext, status: str, sample: bool = False) -> None:
        """The request's line; `sample` treats any status as a refusal (a request the server could not even parse)."""
        if not sample and status not in SAMPLED_STATUSES:
            log_access(context, status)
            return
        key = (context.contract, context.route, status)
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            if window is not None and now < window.ends:
                window.suppressed += 1
                if window.flush is None:
                    window.flush = self._schedule(key, window, window.ends - now)
                return
            earlier = 0
            if window is not None:  # its summary is due but not written yet (a late timer, or none): this line says it
                earlier = window.suppressed
                if window.flush is not None:
                    window.flush.cancel()
            self._windows[key] = _Window(now + self.interval_s)
        log_access(context, status, suppressed=earlier)

    def _schedule(self, key: tuple[str, str, str], window: _Window, delay_s: float) -> asyncio.TimerHandle | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        return loop.call_later(delay_s, self.flush, key, window)

    def flush(self, key: tuple[str, str, str], window: _Window) -> None:
        """Ends `window`, the interval of `key`: one line with the refusals it did not log, and a new interval."""
        with self._lock:
            if self._windows.get(key) is not window:
                return
            suppressed = window.suppressed
            self._windows[key] = _Window(self.clock() + self.interval_s)
        contract, route, status = key
        fields = {"contract": contract, "route": route, "status": status, "suppressed": suppressed, "interval_s": self.interval_s}
        ACCESS_LOG.info("requests refused, not logged one by one", extra={"fields": fields})

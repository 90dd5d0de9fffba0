"""The gateway's HTTP server: uvicorn (httptools) with bounded connections.

uvicorn alone has no limit on how long a client may take to send its request headers, how large they may be,
or how many connections it holds: slow or endless headers from enough clients use up the process's file
descriptors and memory, and normal traffic stops. This module adds, per connection and at the transport
level (before any route runs):

- a header timeout: the request line and headers must arrive within `header_timeout_s` of the connection
  opening or of the previous response ending; otherwise 408 (if part of a request came) and close;
- a header size limit and a header count limit: past either, 431 and close, having held at most
  `max_header_bytes` of them (httptools would otherwise buffer a header of any size);
- a connection cap, below the descriptor limit: a new connection over it takes the place of the connection
  that has waited longest for its request headers (a slow or idle one); when every connection has a request
  in flight, the new one is closed at once.

It also answers every request it cannot parse (a malformed request line, header or body framing; an unsupported
HTTP version) with a JSON error instead of uvicorn's plain-text 400 and a warning line each: in the shape of the
contract at the request's path when the path was read, else in a generic one (`Refusals`). A request that asks to
upgrade to another protocol (WebSocket, h2c) is served as the HTTP/1.1 request it also is: the gateway speaks no
other.

`create_http_server` also keeps the accept loop quiet when descriptors run out anyway (see `_AcceptFailures`), and
has requests that the end of the shutdown grace period cancels answered before the server returns.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import json
import logging
import re
import resource
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

logger = logging.getLogger(__name__)

# Descriptors kept out of the connection cap, so that accept() never fails for lack of them (EMFILE):
# - everything else the process opens. An idle gateway holds 16 (Triton gRPC channel, gRPC listener,
#   epoll/eventfds, log files); on top come one per gRPC client connection (the cap does not see those),
#   sockets Triton's client opens under load and short-lived ones (subprocess pipes on a Triton restart):
#   FD_RESERVE_MIN;
# - the connections accepted before the cap can see them: the event loop accepts whatever waits in the listen
#   queue in one go (asyncio up to `backlog` per wake-up) and runs connection_made only afterwards, so up to
#   `backlog` descriptors beyond the cap are open for a moment.
# At least a tenth of the limit, for headroom on large limits; at most half of it, on tiny ones.
FD_RESERVE_MIN = 256
FD_RESERVE_FRACTION = 10

# At most one log line per this many seconds about accepts that failed for lack of descriptors.
ACCEPT_FAILURE_LOG_INTERVAL_S = 10.0

# How often, at most, the header clock wakes up: a connection is closed at most this late past its timeout.
_CLOCK_GRANULARITY_S = 0.05

# The ASGI scope key under which a request whose body could not be parsed says why (see _fail_body): its body
# reader answers 400 instead of taking the body as complete.
BODY_ERROR: Final = "gateway.body_error"

# Requests cancelled at the end of the shutdown grace period answer within a few loop iterations (the app turns
# their cancellation into a 503); the server waits for them this long at most before it returns.
ANSWER_CANCELLED_S = 1.0

# An HTTP method token (RFC 9110 5.6.2) followed by the space that ends it: a method the parser does not know but
# that is well formed is not implemented here (501), anything else is a malformed request line (400).
_METHOD_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ ")


class Refusals(Protocol):
    """Renders, and accounts for, a request the server answers itself before the app sees it: the JSON body for
    (the request's path, or None when it was not read; status; message; code), and the request id it names (None:
    no id)."""

    def __call__(self, path: str | None, status: int, message: str, code: str) -> tuple[bytes, str | None]: ...


@functools.lru_cache(maxsize=64)
def _generic_body(message: str, code: str) -> bytes:
    # The same few over and over under attack.
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return json.dumps({"error": error}).encode()


def generic_refusal(path: str | None, status: int, message: str, code: str) -> tuple[bytes, str | None]:
    """Refusals of a server that knows no contract: the OpenAI error shape, the most widely understood."""
    return _generic_body(message, code), None


def parser_refusal(error: httptools.HttpParserError, data: bytes | memoryview) -> tuple[int, str, str]:
    """(status, message, code) for a request httptools could not parse; `data` is what was being parsed.

    llhttp's reason names what was wrong (a fixed text of its own, never the request's bytes), so it is passed on.
    """
    reason = str(error) or "unparsable request"
    if isinstance(error, httptools.HttpParserInvalidMethodError):
        if _METHOD_TOKEN.match(bytes(data[:64])):
            return 501, "the request method is not implemented by this server", "method_not_implemented"
        return 400, "malformed request line: the method is not a valid token", "malformed_request"
    if reason == "Invalid HTTP version":  # well formed, but neither 1.0 nor 1.1
        return 505, "HTTP version not supported: use HTTP/1.1", "http_version_not_supported"
    if isinstance(error, (httptools.HttpParserCallbackError, httptools.HttpParserInvalidURLError)):
        # uvicorn's own checks in the callbacks refuse a target that is not a path of ASCII characters.
        return 400, "malformed request target: it must be a path, percent-encoded where not ASCII", "malformed_request"
    return 400, f"malformed HTTP request: {reason}", "malformed_request"


def _path_of(url: bytes) -> str | None:
    """The path of a request target as read so far, for the contract's shape of a refusal; None when there is none
    (nothing read yet, or a target that is no URL)."""
    try:
        path = httptools.parse_url(url).path if url else None
    except httptools.HttpParserError:
        return None
    return path.decode("latin-1") if path else None


@dataclass(frozen=True)
class ConnectionLimits:
    # From a connection's opening, or the end of its previous response, to the end of the request headers.
    header_timeout_s: float = 10.0
    # Request line plus all header lines, as received (CRLFs included).
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    # Open HTTP connections at most; 0 derives it from the descriptor limit (see derive_max_connections).
    max_connections: int = 0

    def __post_init__(self) -> None:
        if not self.header_timeout_s > 0:
            raise ValueError(f"header_timeout_s must be positive, not {self.header_timeout_s}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be at least 1024, not {self.max_header_bytes}")
        if self.max_headers < 1:
            raise ValueError(f"max_headers must be at least 1, not {self.max_headers}")
        if self.max_connections < 0:
            raise ValueError(f"max_connections must be 0 (derive) or positive, not {self.max_connections}")


def raise_fd_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard one (or the kernel's ceiling) and returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # Linux refuses a soft limit above fs.nr_open even when the hard limit is unlimited.
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft, target, error)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def derive_max_connections(backlog: int = 2048) -> int:
    """The connection cap for this process: its (raised) descriptor limit less a reserve (see FD_RESERVE_MIN)."""
    limit = raise_fd_limit()
    reserve = min(max(FD_RESERVE_MIN + backlog, limit // FD_RESERVE_FRACTION), limit // 2)
    return max(1, limit - reserve)


class _Refusal(Exception):
    """Raised in a parser callback to stop parsing; data_received answers it instead of uvicorn's 400."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Waiter(Protocol):
    """A connection the guard's clock holds: one of this server's, waiting for its request headers, or one of the
    gRPC port's (gateway.transports.grpc.connections), waiting for its preface."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def transport(self) -> asyncio.BaseTransport: ...

    def header_timed_out(self) -> None: ...


class _Guard:
    """Per-server state: the cap, and the connections waiting for request headers, oldest first.

    One timer for all of them: everyone shares one timeout, so the oldest waiter always has the earliest
    deadline, and the clock only ever needs to wake for the head of the queue. A connection costs an
    OrderedDict insert and delete per request, instead of a timer handle each.
    """

    def __init__(self, limits: ConnectionLimits, refusals: Refusals = generic_refusal):
        self.limits = limits
        self.refusals = refusals
        self.waiting: collections.OrderedDict[_Waiter, float] = collections.OrderedDict()
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, connection: _Waiter) -> None:
        loop = self.loop = connection.loop
        self.waiting.pop(connection, None)
        self.waiting[connection] = deadline = loop.time() + self.limits.header_timeout_s
        if self.timer is None:
            self.timer = loop.call_at(deadline, self._expire)

    def stop(self, connection: _Waiter) -> None:
        self.waiting.pop(connection, None)

    def evict_oldest(self) -> bool:
        """Closes the connection that has waited longest for request headers; False when none waits."""
        if not self.waiting:
            return False
        connection, _ = self.waiting.popitem(last=False)
        connection.transport.close()
        return True

    def _expire(self) -> None:
        # Only start() arms the timer, and it sets the loop first.
        assert self.loop is not None
        self.timer = None
        now = self.loop.time()
        try:
            while self.waiting:
                connection, deadline = next(iter(self.waiting.items()))
                if deadline > now:
                    break
                del self.waiting[connection]
                connection.header_timed_out()
        finally:  # whatever one connection raised, the clock goes on for the others
            if self.waiting and self.timer is None:
                deadline = next(iter(self.waiting.values()))
                self.timer = self.loop.call_at(max(deadline, now + _CLOCK_GRANULARITY_S), self._expire)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the header limits and the connection cap; `guard` is set per server.

    The hooks, and why each:
    - connection_made: the cap, then the header clock starts;
    - data_received: feeds httptools no more header bytes than allowed. Counting in parser callbacks would be
      too late: httptools concatenates a header's fragments itself before calling on_header. It is a copy of
      uvicorn's method with that budget added, and with every refusal, and every request httptools cannot parse,
      answered in JSON instead of uvicorn's plain-text "Invalid HTTP request" 400 and warning line per request;
    - on_headers_complete: the header count (all of them are in self.headers by then, bounded by the byte
      limit), then the clock stops and uvicorn starts the request; a request asking for an upgrade is held back
      until it is parsed again without it (_reparse_without_upgrade);
    - on_message_complete: the next request's header bytes start counting;
    - on_response_complete: the clock restarts for the next request (uvicorn's keep-alive timeout, which
      only covers an idle connection until its first byte, still applies too);
    - connection_lost: leaves the clock.
    """

    guard: _Guard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Header bytes this connection may still send for its current request; None while no headers are due
        # (a request body, or a request in flight).
        self._header_budget: int | None = self.guard.limits.max_header_bytes
        self._admitted = False
        self._refused = False  # answered 408/431: nothing more is read, whatever the parser's state
        # The current request asked to upgrade (Connection: upgrade): parsed again without it before it is served.
        self._upgrade_ignored = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        guard = self.guard
        if len(self.connections) >= guard.limits.max_connections and not guard.evict_oldest():
            # Every connection has a request in flight: this one is closed at once, without a 503. Answering
            # needs the request read first (a response written before it and then closed with the request
            # unread is reset by the kernel, and the client mostly never sees it), and reading it means
            # holding this descriptor for up to the header timeout, exactly what the cap is there to stop.
            # Closing costs nothing, and clients see it as the connection error it is.
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        guard.start(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self.guard.stop(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        budget = self._header_budget
        if budget is None or len(data) <= budget:
            if budget is not None:
                self._header_budget = budget - len(data)
            self._feed(data)
            return
        # More than the header budget in this read: feed the parser what the budget allows; if the headers
        # ended within it, go on with the rest (body, or further pipelined requests), else refuse.
        view = memoryview(data)
        while view:
            budget = self._header_budget
            if budget is None:
                self._feed(view)
                return
            if budget == 0:
                limit = self.guard.limits.max_header_bytes
                self._refuse(431, f"request line and headers exceed {limit} bytes", "headers_too_large")
                return
            chunk, view = view[:budget], view[budget:]
            self._header_budget = budget - len(chunk)
            if not self._feed(chunk):
                return

    def _feed(self, data: bytes | memoryview) -> bool:
        """uvicorn's data_received, except that a _Refusal, and a request httptools cannot parse, are answered in
        JSON, and an upgrade is not made; False when parsing stopped."""
        while True:
            try:
                self.parser.feed_data(data)
                return True
            except httptools.HttpParserUpgrade as upgrade:
                # A loop, not a call: pipelined upgrade requests, as many as fit in one read, would nest that deep.
                data = self._reparse_without_upgrade() + bytes(data[upgrade.args[0] :])
            except httptools.HttpParserError as error:
                self._refuse_unparsable(error, data)
                return False

    def _refuse_unparsable(self, error: httptools.HttpParserError, data: bytes | memoryview) -> None:
        # httptools wraps an exception raised in a callback, keeping it as the context.
        if isinstance(error.__context__, _Refusal):
            refusal = error.__context__
            self._refuse(refusal.status, refusal.message, refusal.code)
            return
        cycle = self.cycle
        if cycle is None or not cycle.more_body:  # a request not started yet: its head is what is wrong
            self._refuse(*parser_refusal(error, data))
        elif cycle.response_complete:  # answered without its body, whose rest is of no use now
            self._refused = True
            self.transport.close()
        else:
            self._fail_body(cycle, str(error) or "unparsable framing")

    def _fail_body(self, cycle: RequestResponseCycle, message: str) -> None:
        """The body of a request already handed to the app cannot be parsed (its chunked framing, say): the body
        ends there, marked as malformed for the app's body reader (BODY_ERROR), whose route answers 400 in its
        contract's shape, and the connection closes after that answer, reading nothing more."""
        self._refused = True
        # ASGI lets a server add keys of its own to the scope; uvicorn's TypedDict lists only the standard ones.
        cycle.scope[BODY_ERROR] = message  # type: ignore[typeddict-unknown-key]
        cycle.keep_alive = False
        cycle.more_body = False
        cycle.message_event.set()

    def _reparse_without_upgrade(self) -> bytes:
        """The head of the request that asked to upgrade, without the ask, and a fresh parser for it.

        llhttp stops at the end of the headers of such a request and leaves what follows (its body, further
        requests) to the new protocol. The gateway speaks none (RFC 9110 7.8 lets a server ignore Upgrade), and
        curl --http2 asks for h2c on every plain-HTTP request, its POST bodies included: the head is parsed again
        without Upgrade, followed by the rest, and the request is served as HTTP/1.1.
        """
        self._upgrade_ignored = False
        lines = [b"%s %s HTTP/%s\r\n" % (self.parser.get_method(), self.url, self.parser.get_http_version().encode())]
        for name, value in self.headers:
            if name == b"upgrade":
                continue
            if name == b"connection":
                value = b",".join(t for t in value.split(b",") if t.strip().lower() != b"upgrade")
                if not value.strip():
                    continue
            lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"\r\n")
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets it
        return b"".join(lines)

    def on_headers_complete(self) -> None:
        if len(self.headers) > self.guard.limits.max_headers:
            raise _Refusal(431, f"more than {self.guard.limits.max_headers} request headers", "too_many_headers")
        if self.parser.should_upgrade():
            if self.parser.get_method() == b"CONNECT":  # always an upgrade to llhttp: a tunnel, which is not served here
                raise _Refusal(501, "CONNECT is not implemented: this server is not a proxy", "method_not_implemented")
            self._upgrade_ignored = True  # served once parsed again (_reparse_without_upgrade)
            return
        self._header_budget = None
        self.guard.stop(self)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._upgrade_ignored:  # nothing was started for it yet
            return
        self._header_budget = self.guard.limits.max_header_bytes
        super().on_message_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        # A pipelined request already has its headers; otherwise the next request's are due from now.
        if not pipelined and not self.transport.is_closing():
            self.guard.start(self)

    def header_timed_out(self) -> None:
        if self.transport.is_closing():
            return
        limits = self.guard.limits
        if self._header_budget is not None and self._header_budget < limits.max_header_bytes:
            # Part of a request came: say why it is not answered.
            self._refuse(408, f"request headers not received within {limits.header_timeout_s:g} s", "header_timeout")
        else:
            # Nothing came (a new or idle keep-alive connection): close, as for uvicorn's keep-alive timeout.
            # A 408 here could be read by a client as the answer to a request it is sending just now.
            self.transport.close()

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answers status with a JSON error and closes; never in the middle of another response."""
        self.guard.stop(self)
        self._header_budget = None
        self._refused = True
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request came while the previous response is still being written: end that
            # response, then close, reading nothing more meanwhile.
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        body, request_id = self.guard.refusals(_path_of(getattr(self, "url", b"")), status, message, code)
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:  # date and server, as on every other response
            content.extend([name, b": ", value, b"\r\n"])
        if request_id is not None:
            content.extend([b"x-request-id: ", request_id.encode(), b"\r\n"])
        content.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        content.append(body)
        self.transport.write(b"".join(content))
        self.transport.close()


class _AcceptFailures:
    """Counts accepts that failed for lack of descriptors, instead of a traceback each, and logs the count at
    most once per ACCEPT_FAILURE_LOG_INTERVAL_S.

    Only asyncio's own loop reports these: on EMFILE/ENFILE its accept loop calls the exception handler once
    per failed accept() (up to `backlog` times per wake-up, each with a traceback) and retries a second later.
    uvloop (libuv) reports nothing: it accepts and closes the pending connections on a descriptor it keeps
    in reserve for that purpose.
    """

    MESSAGE = "socket.accept() out of system resource"
    # asyncio schedules its retry once per failed accept(), up to `backlog` (2048) of them a wake-up. Those that come
    # due after the server closed its socket at shutdown find no descriptor (ValueError): nothing is lost then, and a
    # traceback each kept a slow machine past its shutdown grace.
    RETRY = "_start_serving"

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.failed = 0
        self.last_errno = 0
        self.last_logged = float("-inf")
        self.flush_handle: asyncio.TimerHandle | None = None
        self.previous = loop.get_exception_handler()
        loop.set_exception_handler(self._handle)

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exception = context.get("exception")
        if context.get("message") == self.MESSAGE and isinstance(exception, OSError):
            self.failed += 1
            self.last_errno = exception.errno or 0
            if self.flush_handle is None:
                delay = max(0.0, self.last_logged + ACCEPT_FAILURE_LOG_INTERVAL_S - loop.time())
                self.flush_handle = loop.call_later(delay, self.flush)
            return
        if isinstance(exception, ValueError) and self.RETRY in str(context.get("message", "")):
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def flush(self) -> None:
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        if self.failed:
            reason = errno.errorcode.get(self.last_errno, str(self.last_errno))
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            logger.warning(
                "accept() failed %d times (%s, open-file limit %d) since the last such line; "
                "those clients wait in the listen queue or are refused",
                self.failed,
                reason,
                soft,
            )
            self.failed = 0
            self.last_logged = self.loop.time()

    def uninstall(self) -> None:
        self.flush()
        if self.loop.get_exception_handler() == self._handle:
            self.loop.set_exception_handler(self.previous)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (the caller stops every listener, then Triton, on one signal),
    that counts failed accepts quietly while it serves, and that returns from a shutdown only once the requests it
    cancelled have answered."""

    def __init__(self, config: uvicorn.Config, limits: ConnectionLimits, guard: _Guard):
        super().__init__(config)
        self.limits = limits
        self._guard = guard

    def capture_signals(self):
        return contextlib.nullcontext()

    async def serve(self, sockets=None) -> None:
        accept_failures = _AcceptFailures(asyncio.get_running_loop())
        try:
            await super().serve(sockets)
        finally:
            accept_failures.uninstall()
            self._guard.close()

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        # uvicorn cancels the requests still running when the grace period ends, and returns at once. The app
        # answers each of them (503) in the next loop iterations; the caller ends the event loop after serve()
        # returns, which would cancel them again, unanswered.
        if self.server_state.tasks:
            await asyncio.wait(self.server_state.tasks, timeout=ANSWER_CANCELLED_S)


def resolved_limits(limits: ConnectionLimits, backlog: int = 2048) -> ConnectionLimits:
    """The limits a server enforces: max_connections derived from the open-file limit when 0, and lowered to that
    derived cap when set above it."""
    derived = derive_max_connections(backlog)
    if limits.max_connections <= 0:
        return replace(limits, max_connections=derived)
    if limits.max_connections > derived:
        logger.warning(
            "max_connections %d leaves too few of the %d open files for the rest of the process; using %d",
            limits.max_connections,
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            derived,
        )
        return replace(limits, max_connections=derived)
    return limits


def create_http_server(
    app, host: str, port: int, limits: ConnectionLimits, refusals: Refusals = generic_refusal, **config_kwargs: Any
) -> _Server:
    """A uvicorn server for app on host:port with limits enforced; config_kwargs go to uvicorn.Config (not http).

    `refusals` renders the requests the server answers itself (unparsable, headers too slow or too large). Raises
    the process's soft open-file limit to its hard one. The server's `limits` attribute holds the limits in force,
    with max_connections resolved (derived when 0, and lowered to the derived cap if set above it).
    """
    limits = resolved_limits(limits, config_kwargs.get("backlog", 2048))
    guard = _Guard(limits, refusals)
    protocol = type("LimitedHttpToolsProtocol", (_LimitedHttpToolsProtocol,), {"guard": guard})
    # No WebSocket: nothing here speaks it, and an upgrade request is served as plain HTTP (_reparse_without_upgrade).
    config_kwargs.setdefault("ws", "none")
    config = uvicorn.Config(app, host=host, port=port, http=protocol, **config_kwargs)
    return _Server(config, limits, guard)

"""The gateway's HTTP stack in-process, for the fast tier: the real app (every route, the middleware, the real
catalog and core) over a scheduler whose Triton is tests.fake_triton.FakeTriton, served by the real protocol of gateway.transports.http.server
through a transport that records what it would send. No socket, no process, no Triton.
"""

from __future__ import annotations

import asyncio
import json

from gateway.core.catalog import Catalog
from gateway.core.scheduler import Scheduler
from gateway.core.service import EmbeddingService
from gateway.ops.metrics import Metrics
from gateway.transports.http.app import build_app, protocol_refusals
from gateway.transports.http.server import ConnectionLimits, create_http_server
from gateway.transports.policy import RequestPolicy
from tests.fake_triton import FakeTriton


class Gateway:
    """The app and its parts, for a test to drive and inspect, and a helper to send one request and read its answer."""

    def __init__(
        self,
        models: Catalog,
        max_body_bytes: int = 4 * 1024 * 1024,
        timeout_s: float = 30.0,
        *,
        max_calls_per_lane: int = 4,
        max_rows_in_flight: int = 128,
    ):
        self.model = next(iter(models.models.values()))
        self.triton = FakeTriton(self.model)
        self.scheduler = Scheduler(
            self.triton,
            self.triton.send,
            max_pending_texts=32768,
            max_rows_in_flight=max_rows_in_flight,
            max_calls_per_lane=max_calls_per_lane,
        )
        self.service = EmbeddingService(models, self.scheduler, max_inputs=2048, truncate=False, timeout_s=timeout_s)
        self.metrics = Metrics()
        self.policy = RequestPolicy(None, self.metrics)
        self.app = build_app(self.service, max_body_bytes, self.policy)
        self.server = create_http_server(
            self.app, "127.0.0.1", 0, ConnectionLimits(header_timeout_s=30), protocol_refusals(self.policy), log_config=None
        )
        self.server.config.load()

    def connect(self) -> Connection:
        config = self.server.config
        protocol = config.http_protocol_class(config=config, server_state=self.server.server_state, app_state={})
        return Connection(protocol)

    def counted(self, route: str, status: int) -> float:
        """requests_total of a route and status, over every contract."""
        total = 0.0
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                if (
                    sample.name == "embed_gateway_requests_total"
                    and sample.labels["route"] == route
                    and sample.labels["status"] == str(status)
                ):
                    total += sample.value
        return total

    @staticmethod
    def message(method: str, path: str, body: object = None, headers: dict[str, str] | None = None) -> bytes:
        data = b"" if body is None else json.dumps(body).encode()
        head = [f"{method} {path} HTTP/1.1", "Host: x"]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + data

    async def request(
        self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None, timeout_s: float = 5.0
    ) -> Response:
        connection = self.connect()
        try:
            connection.send(self.message(method, path, body, headers))
            return await connection.response(timeout_s=timeout_s)
        finally:
            connection.close()

    async def post(self, path: str, body: dict, headers: dict[str, str] | None = None) -> Response:
        """POSTs `body` as JSON, with the served model's name unless it names one."""
        return await self.request("POST", path, {"model": self.model.name, **body}, headers)


class Transport(asyncio.Transport):
    """Records what the server writes; each write and the close wake whoever waits for an answer."""

    def __init__(self):
        super().__init__()
        self.sent = bytearray()
        self.closed = False
        self.changed = asyncio.Event()

    def write(self, data) -> None:
        self.sent += data
        self.changed.set()

    def close(self) -> None:
        self.closed = True
        self.changed.set()

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def _parse_one(data: bytearray, at: int, head_only: bool) -> tuple[Response, int] | None:
    """The first complete response in data from offset `at`, and the offset after it; None while it is incomplete."""
    end = data.find(b"\r\n\r\n", at)
    if end < 0:
        return None
    lines = data[at:end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    start = end + 4
    if head_only:
        return Response(status, headers, b""), start
    if headers.get("transfer-encoding") == "chunked":
        body, at = b"", start
        while True:
            line_end = data.find(b"\r\n", at)
            if line_end < 0:
                return None
            size = int(data[at:line_end], 16)
            if len(data) < line_end + 2 + size + 2:
                return None
            body += data[line_end + 2 : line_end + 2 + size]
            at = line_end + 2 + size + 2
            if size == 0:
                return Response(status, headers, body), at
    length = int(headers.get("content-length", "0"))
    if len(data) < start + length:
        return None
    return Response(status, headers, bytes(data[start : start + length])), start + length


class Connection:
    """One client connection to the protocol."""

    def __init__(self, protocol):
        self.protocol = protocol
        self.transport = Transport()
        protocol.connection_made(self.transport)
        self._read = 0

    def send(self, data: bytes) -> None:
        self.protocol.data_received(data)

    async def response(self, head_only: bool = False, timeout_s: float = 10.0) -> Response:
        """The next response the server sends on this connection (head_only: the answer to a HEAD, which has none)."""
        async with asyncio.timeout(timeout_s):
            while True:
                parsed = _parse_one(self.transport.sent, self._read, head_only)
                if parsed is not None:
                    response, self._read = parsed
                    return response
                if self.transport.closed:
                    raise AssertionError(f"closed after {bytes(self.transport.sent[self._read :])!r}")
                self.transport.changed.clear()
                await self.transport.changed.wait()

    def close(self) -> None:
        if not self.transport.closed:
            self.transport.close()
        self.protocol.connection_lost(None)

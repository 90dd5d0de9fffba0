"""The gRPC port's connection limits: a cap, a preface timeout, and a share of the process's descriptors.

grpc's server has a connection cap of its own ("grpc.max_allowed_incoming_connections") and a handshake timeout
("grpc.server_handshake_timeout_ms"); both work in grpcio 1.85. But over its cap grpc closes the newest connection,
so idle connections that an attacker reopens as soon as they are closed hold every place, and a real client
almost never gets one (measured: 0 of 20 fresh channels got through 200 reopened idle connections against a cap
of 50). So the public gRPC port is this module's, and grpc itself listens on a private Unix socket:

- a connection must send the HTTP/2 client preface within `handshake_timeout_s`, else it is closed;
- at most `max_connections` are open; a new one over the cap takes the place of the one that has waited longest
  for its preface (the HTTP port's policy, with its clock: gateway/transports/http/server.py); when every one has sent its
  preface, the new one is closed at once;
- a connection that sent the preface is relayed, bytes as they come, to grpc's socket, where grpc's own
  handshake timeout covers the rest of the handshake (the client's SETTINGS) and its own cap is a backstop.

Every gRPC client sends the preface in its first write, so a real one waits for nothing here.

A relayed connection holds three descriptors (the client's socket, ours to grpc, grpc's end), a waiting one
holds one; split_descriptors shares the process's connection budget between the HTTP and the gRPC port with
that in mind, so that neither port can take the other's descriptors.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from dataclasses import dataclass

from gateway.transports.http.server import ConnectionLimits, _Guard

logger = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Descriptors a relayed gRPC connection holds: the client's socket, the gateway's to grpc, grpc's end of it.
FDS_PER_GRPC_CONNECTION = 3
# The gRPC port's part of the connection budget's descriptors. A gRPC client holds one connection per channel
# and multiplexes its calls on it, where an HTTP client opens a connection per concurrent request.
GRPC_SHARE = 4
# Its listen backlog: connections the event loop accepts in one go before the cap sees them, so within its share.
# A sixteenth of the budget on tiny limits; a channel connects once, so a few hundred are plenty.
GRPC_BACKLOG_MAX = 512


@dataclass(frozen=True)
class DescriptorBudget:
    """Connections each port may hold at once, out of one budget of descriptors."""

    http_connections: int
    grpc_connections: int
    grpc_backlog: int


def split_descriptors(budget: int, http_connections: int = 0, grpc_connections: int = 0) -> DescriptorBudget:
    """Shares `budget` descriptors (the process's raised open-file limit less a reserve, see
    gateway.transports.http.server.derive_max_connections) between the ports: a quarter for gRPC (its relayed connections at
    FDS_PER_GRPC_CONNECTION each, and its backlog), the rest for HTTP. A cap given as a setting (not 0) is kept."""
    backlog = max(1, min(GRPC_BACKLOG_MAX, budget // 16))
    grpc_connections = grpc_connections or max(1, (budget // GRPC_SHARE - backlog) // FDS_PER_GRPC_CONNECTION)
    grpc_descriptors = grpc_connections * FDS_PER_GRPC_CONNECTION + backlog
    http_connections = http_connections or max(1, budget - grpc_descriptors)
    if http_connections + grpc_descriptors > budget:
        logger.warning(
            "%d HTTP and %d gRPC connections (%d descriptors each) can take more than the %d descriptors the "
            "process has for connections: one port can starve the other",
            http_connections,
            grpc_connections,
            FDS_PER_GRPC_CONNECTION,
            budget,
        )
    return DescriptorBudget(http_connections, grpc_connections, backlog)


@dataclass(frozen=True)
class GrpcConnectionLimits:
    max_connections: int
    backlog: int
    # From a connection's opening to the end of its HTTP/2 preface, and again (inside grpc) to its SETTINGS.
    handshake_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.backlog < 1:
            raise ValueError(f"max_connections and backlog must be positive, not {self.max_connections}, {self.backlog}")
        if not self.handshake_timeout_s > 0:
            raise ValueError(f"handshake_timeout_s must be positive, not {self.handshake_timeout_s}")

    def grpc_options(self) -> list[tuple[str, int]]:
        """grpc's own limits on its private socket. Its cap is only a backstop (the gate holds no more than
        max_connections), and twice as high: grpc releases a connection a moment after the gate has."""
        return [
            ("grpc.max_allowed_incoming_connections", 2 * self.max_connections),
            ("grpc.server_handshake_timeout_ms", max(1, round(self.handshake_timeout_s * 1000))),
        ]


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound sockets for every address host resolves to, all on one port (port 0: the first one's free port),
    as grpc's own add_insecure_port binds them."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.setblocking(False)
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise RuntimeError(f"could not listen on {host}:{port} for gRPC: {error.strerror or error}") from None
    return sockets


def private_address() -> tuple[str, str]:
    """(grpc's address, the same for socket.connect) of a Unix socket in the abstract namespace: nothing on disk
    to clean up, and a name no other gateway on the machine picks."""
    name = f"embedding-gateway-grpc-{os.getpid()}-{secrets.token_hex(8)}"
    return f"unix-abstract:{name}", "\0" + name


class ConnectionGate:
    """The public gRPC listeners: counts connections, holds those waiting for their preface, relays the others."""

    def __init__(self, sockets: list[socket.socket], upstream: str, limits: GrpcConnectionLimits):
        self.sockets = sockets
        self.upstream = upstream
        self.limits = limits
        self.guard = _Guard(ConnectionLimits(header_timeout_s=limits.handshake_timeout_s))
        self.connections: set[_Inbound] = set()
        self._servers: list[asyncio.Server] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def port(self) -> int:
        return self.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for sock in self.sockets:
            server = await self.loop.create_server(lambda: _Inbound(self), sock=sock, backlog=self.limits.backlog)
            self._servers.append(server)

    def stop_accepting(self) -> None:
        """New connections are refused from now on; those open go on."""
        for server in self._servers:
            server.close()
        for sock in self.sockets:
            sock.close()

    def close(self) -> None:
        self.stop_accepting()
        for connection in list(self.connections):
            connection.transport.close()
        self.guard.close()


class _Inbound(asyncio.Protocol):
    """A connection on the public port: first waiting for its preface (the clock is _Guard's, which calls it a
    header), then relayed to grpc."""

    transport: asyncio.Transport  # set by connection_made, which asyncio calls before any other method

    def __init__(self, gate: ConnectionGate):
        # The gate's listeners, which create every connection, are started (start()) once its loop is set.
        assert gate.loop is not None
        self.gate = gate
        self.loop = gate.loop
        self.received = b""  # what came before the relay was up: the preface and whatever followed it
        self.upstream: asyncio.Transport | None = None
        self.connecting: asyncio.Task | None = None
        self.admitted = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        gate = self.gate
        if len(gate.connections) >= gate.limits.max_connections and not gate.guard.evict_oldest():
            # Every connection is relayed, so past its preface: this one is turned away, as on the HTTP port.
            transport.close()
            return
        self.admitted = True
        gate.connections.add(self)
        gate.guard.start(self)

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
            return
        self.received += data
        if not (PREFACE.startswith(self.received) or self.received.startswith(PREFACE)):
            self.transport.close()  # not HTTP/2: grpc would close it too
            return
        if len(self.received) >= len(PREFACE) and self.connecting is None:
            self.gate.guard.stop(self)
            self.transport.pause_reading()
            self.connecting = self.loop.create_task(self._relay())

    async def _relay(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await self.loop.sock_connect(sock, self.gate.upstream)
            upstream, _ = await self.loop.create_unix_connection(lambda: _Outbound(self), sock=sock)
        except OSError as error:
            sock.close()
            logger.warning("could not relay a gRPC connection to the gRPC server: %s", error)
            self.transport.close()
            return
        except asyncio.CancelledError:  # the client left meanwhile
            sock.close()
            raise
        if self.transport.is_closing():
            upstream.close()
            return
        self.upstream = upstream
        upstream.write(self.received)
        self.received = b""
        self.transport.resume_reading()

    def header_timed_out(self) -> None:
        self.transport.close()

    def eof_received(self) -> bool:
        if self.upstream is None:
            return False  # closes
        # The client is done sending; grpc may still be answering, and closes when it is done.
        if self.upstream.can_write_eof():
            self.upstream.write_eof()
        return True

    def pause_writing(self) -> None:
        # The client reads slower than grpc answers: grpc waits, rather than the relay buffering without bound.
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        self.gate.connections.discard(self)
        self.gate.guard.stop(self)
        if self.connecting is not None:
            self.connecting.cancel()
        if self.upstream is not None:
            self.upstream.close()


class _Outbound(asyncio.Protocol):
    """The relay's connection to grpc, for one _Inbound."""

    def __init__(self, inbound: _Inbound):
        self.inbound = inbound

    def data_received(self, data: bytes) -> None:
        self.inbound.transport.write(data)

    def pause_writing(self) -> None:
        # grpc reads slower than the client sends: the client waits (TCP flow control), not our memory.
        self.inbound.transport.pause_reading()

    def resume_writing(self) -> None:
        self.inbound.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        # grpc closed the connection (GOAWAY sent, stopped, handshake timeout): so does the client's, once what
        # grpc wrote has gone out.
        self.inbound.transport.close()

"""Several Tritons behind one gateway: each health-checked on its own, calls sent to the least loaded ready one.

`--triton-url` names one or more `host:port` targets. A host that is a DNS name stands for every address it
resolves to (a Kubernetes headless Service resolves to one address per ready Triton pod), and it is resolved
again every dns_refresh_s, so Tritons that come and go are picked up and dropped without a restart. One
long-lived gRPC connection per address, rather than one to a load-balanced Service address, is what lets the
gateway spread calls at all: a Service balances connections, and the gateway holds few.

A call that finds its Triton unavailable marks it unready at once, so that the scheduler's retry goes to
another (or waits, through wait_ready, for one to be ready again); the health poll takes it back as soon as it
answers ready again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass

import numpy as np

from gateway.core.errors import ErrorKind, ServiceError
from gateway.core.scheduler import Lane
from gateway.triton.client import TritonClient
from gateway.triton.supervisor import TritonHealth

log = logging.getLogger("gateway.triton")


@dataclass(frozen=True)
class Target:
    host: str
    port: int

    @property
    def is_address(self) -> bool:
        try:
            ipaddress.ip_address(self.host.strip("[]"))
        except ValueError:
            return False
        return True


def parse_targets(spec: str) -> list[Target]:
    """`host:port[,host:port...]`; an IPv6 address goes in brackets, as in a URL."""
    targets = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--triton-url wants host:port[,host:port...], got {part!r}")
        targets.append(Target(host, int(port)))
    if not targets:
        raise ValueError("--triton-url names no Triton")
    return targets


async def resolve(target: Target) -> list[str]:
    """The gRPC addresses a target stands for: itself if it is an address, else every address of its name.

    IPv4 addresses are taken when the name has any and IPv6 only otherwise: `localhost` resolves to both
    127.0.0.1 and ::1, which are one Triton, not two.
    """
    if target.is_address:
        return [f"{target.host}:{target.port}"]
    infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    v4 = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET})
    v6 = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET6})
    return [f"{a}:{target.port}" for a in v4] or [f"[{a}]:{target.port}" for a in v6]


@dataclass(eq=False)
class Endpoint:
    """One Triton: its health (which holds its connection), and the rows the gateway has sent it that are not
    answered yet."""

    health: TritonHealth
    rows_in_flight: int = 0

    @property
    def client(self) -> TritonClient:
        return self.health.triton

    @property
    def url(self) -> str:
        return self.health.triton.url


class TritonPool:
    """The gateway's view of its Tritons. For the scheduler and the probes it is one backend: ready while any
    Triton is, down for good only when every one is."""

    def __init__(
        self,
        targets: list[Target],
        *,
        dns_refresh_s: float = 5.0,
        poll_s: float = 0.25,
        probe_timeout_s: float = 1.0,
    ):
        self.targets = targets
        self.dns_refresh_s = dns_refresh_s
        self.poll_s = poll_s
        self.probe_timeout_s = probe_timeout_s
        self.endpoints: dict[str, Endpoint] = {}
        # Endpoints whose name no longer resolves: closed once their calls in flight are answered.
        self._retiring: list[Endpoint] = []
        # Each target's addresses at its last successful resolution.
        self._addresses: dict[Target, list[str]] = {}
        self._any_ready = asyncio.Event()
        self.ready_count = 0
        self._turn = 0
        self._since_resolved = time.monotonic()

    @classmethod
    async def connect(cls, spec: str, **options) -> TritonPool:
        """A pool for the targets of `spec`, resolved and checked once, so that the first request knows where to go."""
        pool = cls(parse_targets(spec), **options)
        await pool.refresh_addresses()
        await pool.check()
        return pool

    def adopt(self, health: TritonHealth) -> None:
        """Adds a Triton whose health someone else also watches (the supervisor of the Triton the gateway started)."""
        health.on_change = self._changed
        self.endpoints[health.triton.url] = Endpoint(health)
        self._changed()

    # -- the backend the scheduler and the probes see ------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.ready_count > 0

    @property
    def reason(self) -> str:
        if not self.endpoints:
            return f"no Triton found at {', '.join(f'{t.host}:{t.port}' for t in self.targets)}"
        return "; ".join(f"{e.url}: {e.health.reason}" for e in self.endpoints.values() if not e.health.ready) or "ready"

    def down_for_good(self, recovery_s: float) -> bool:
        # Asked before every request: the common answer must cost nothing.
        return not self.ready_count and all(e.health.down_for_good(recovery_s) for e in self.endpoints.values())

    async def wait_ready(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._any_ready.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _changed(self) -> None:
        self.ready_count = sum(1 for e in self.endpoints.values() if e.health.ready)
        if self.ready_count:
            self._any_ready.set()
        else:
            self._any_ready.clear()

    # -- calls ---------------------------------------------------------------------------------------------------

    def _pick(self) -> Endpoint | None:
        """The ready Triton with the fewest rows in flight; ties go round, so an idle pool is used evenly."""
        ready = [e for e in self.endpoints.values() if e.health.ready]
        if not ready:
            return None
        self._turn = (self._turn + 1) % len(ready)
        rotated = ready[self._turn :] + ready[: self._turn]
        return min(rotated, key=lambda e: e.rows_in_flight)

    async def infer(self, lane: Lane, data: np.ndarray, timeout_s: float, request_id: str) -> tuple[np.ndarray, np.ndarray]:
        endpoint = self._pick()
        if endpoint is None:
            # Waiting for a Triton to become ready is the scheduler's retry policy, not a second one here.
            raise ServiceError(ErrorKind.UNAVAILABLE, f"no inference server is ready ({self.reason})")
        endpoint.rows_in_flight += len(data)
        try:
            return await endpoint.client.infer(lane, data, timeout_s, request_id)
        except ServiceError as error:
            if error.kind is ErrorKind.UNAVAILABLE:
                # The scheduler retries the call; marking the Triton unready now sends that retry elsewhere
                # instead of to the same dead connection until the next poll notices.
                endpoint.health.set(False, f"a call failed: {error.message}")
            raise
        finally:
            endpoint.rows_in_flight -= len(data)

    # -- keeping the view current --------------------------------------------------------------------------------

    async def check(self) -> None:
        await asyncio.gather(*(e.health.check() for e in list(self.endpoints.values())))

    async def refresh_addresses(self) -> None:
        """Re-resolves the targets: new addresses join (unready until checked), vanished ones retire. A name that
        does not resolve right now keeps its addresses: a DNS hiccup must not empty the pool."""
        for target in self.targets:
            try:
                self._addresses[target] = await resolve(target)
            except OSError as error:
                log.warning("could not resolve %s (%s); keeping its Tritons", target.host, error)
        wanted = {url for urls in self._addresses.values() for url in urls}
        for url in sorted(wanted - self.endpoints.keys()):
            log.info("Triton %s joins", url)
            self.endpoints[url] = Endpoint(
                TritonHealth(TritonClient(url), timeout_s=self.probe_timeout_s, on_change=self._changed)
            )
        for url in sorted(self.endpoints.keys() - wanted):
            log.info("Triton %s left the DNS answer; no more calls go to it", url)
            self._retiring.append(self.endpoints.pop(url))
        self._changed()
        await self._close_retired()

    async def _close_retired(self) -> None:
        idle = [e for e in self._retiring if e.rows_in_flight == 0]
        self._retiring = [e for e in self._retiring if e.rows_in_flight]
        for endpoint in idle:
            await endpoint.client.close()

    async def run(self) -> None:
        """Polls every Triton's readiness and, for DNS names, their addresses; cancelled when the gateway stops."""
        resolves = any(not t.is_address for t in self.targets)
        while True:
            await asyncio.sleep(self.poll_s)
            if resolves and time.monotonic() - self._since_resolved >= self.dns_refresh_s:
                self._since_resolved = time.monotonic()
                await self.refresh_addresses()
            await self.check()

    async def close(self) -> None:
        for endpoint in [*self.endpoints.values(), *self._retiring]:
            await endpoint.client.close()

"""Keeps track of whether Triton can serve, and restarts the Triton the gateway started when it cannot.

Readiness is polled in the background (by gateway.triton.pool), so /health and gRPC health answer from memory
at once even while Triton is stalled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.triton.process import TritonProcess, TritonStartError

if TYPE_CHECKING:
    from gateway.triton.client import TritonClient

log = logging.getLogger("gateway.supervisor")


class TritonHealth:
    """Whether one Triton answers and every model is ready, checked (by the pool's poll, gateway.triton.pool) with a
    probe that gives up after timeout_s."""

    def __init__(self, triton: TritonClient, timeout_s: float = 1.0, on_change: Callable[[], None] = lambda: None):
        self.triton = triton
        self.timeout_s = timeout_s
        self.reason = "not checked yet"
        self.not_ready_since = time.monotonic()
        self.ever_ready = False
        self.ready = False
        # A fault the supervisor found (a dead stub) outweighs Triton's own ready endpoint, which stays green.
        self.fault: str | None = None
        # Told of every change of readiness: the pool of Tritons keeps its count of ready ones from it.
        self.on_change = on_change

    def set(self, ready: bool, reason: str = "") -> None:
        if ready == self.ready:
            return
        self.ready = ready
        if ready:
            self.ever_ready = True
            log.info(
                "Triton %s is ready (it was not for %.1f s: %s)",
                self.triton.url,
                time.monotonic() - self.not_ready_since,
                self.reason,
            )
        else:
            self.not_ready_since = time.monotonic()
            log.warning("Triton %s is not ready: %s", self.triton.url, reason)
        self.reason = reason
        self.on_change()

    def down_for_good(self, recovery_s: float) -> bool:
        """Never ready yet, or unready for longer than a restart takes: a new request would only wait for its deadline."""
        return not self.ready and (not self.ever_ready or time.monotonic() - self.not_ready_since > recovery_s)

    async def check(self) -> None:
        if self.fault is not None:
            self.set(False, self.fault)
        elif await self.triton.server_ready(self.timeout_s):
            self.set(True)
        else:
            self.set(False, f"Triton at {self.triton.url} did not answer ready within {self.timeout_s:.0f} s")


class TritonSupervisor:
    """Restarts the gateway's own Triton when it exits, loses a stub, or stays unready for stall_restart_s."""

    MIN_BACKOFF_S = 0.5
    MAX_BACKOFF_S = 30.0
    # A Triton that served this long after a restart starts the next backoff from the minimum again.
    STABLE_S = 60.0

    def __init__(
        self,
        process: TritonProcess,
        health: TritonHealth,
        stall_restart_s: float,
        check_s: float = 0.1,
        on_restart: Callable[[], None] = lambda: None,
    ):
        self.process = process
        self.health = health
        self.stall_restart_s = stall_restart_s
        self.check_s = check_s
        self.on_restart = on_restart
        self.restarts = 0

    def _fault(self) -> str | None:
        fault = self.process.fault()
        if fault is None and not self.health.ready:
            stalled_s = time.monotonic() - self.health.not_ready_since
            if stalled_s > self.stall_restart_s:
                fault = f"not ready for {stalled_s:.0f} s ({self.health.reason})"
        return fault

    async def run(self) -> None:
        backoff = self.MIN_BACKOFF_S
        started = time.monotonic()
        while True:
            await asyncio.sleep(self.check_s)
            fault = self._fault()
            if fault is None:
                continue
            self.health.fault = fault
            self.health.set(False, fault)
            log.warning("restarting Triton: %s", fault)
            # Killed at once: a broken Triton has nothing worth draining, and calls in flight are retried.
            await asyncio.to_thread(self.process.stop, 0)
            if self.restarts and time.monotonic() - started < self.STABLE_S:
                # It failed again soon after the last restart: back off instead of crash-looping.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.MAX_BACKOFF_S)
            else:
                backoff = self.MIN_BACKOFF_S
            while True:
                try:
                    await asyncio.to_thread(self.process.start)
                    break
                except TritonStartError as error:
                    log.error("Triton restart failed (%s); next try in %.1f s", error, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.MAX_BACKOFF_S)
            self.restarts += 1
            self.on_restart()
            started = time.monotonic()
            self.health.fault = None
            await self.health.check()
            log.warning("Triton restarted (restart %d)", self.restarts)

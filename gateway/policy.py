"""What every call goes through before its route or method, whichever transport it came by."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.auth import Authenticator
from gateway.metrics import Metrics
from gateway.supervisor import TritonHealth


@dataclass(frozen=True)
class RequestPolicy:
    # None: authentication is off.
    authenticator: Authenticator | None
    metrics: Metrics
    # Without authentication on a loopback listener, a browser page on another site can still reach it through DNS
    # rebinding; such a request names that site in Host, so only loopback names are accepted then (HTTP only).
    loopback_host_only: bool = False
    # /metrics without a token even when authentication is on, so Prometheus needs no credentials.
    metrics_open: bool = True

    def unready_reason(self, health: TritonHealth) -> str | None:
        """Why the gateway cannot serve now (Triton or a model not ready, the token store unreachable), or None."""
        if not health.ready:
            return health.reason
        if self.authenticator is not None and not self.authenticator.store_ok:
            return "the token store is unreachable"
        return None

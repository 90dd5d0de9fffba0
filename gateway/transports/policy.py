"""What every call goes through before its route or method, whichever transport it came by."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.auth.authenticator import Authenticator
from gateway.auth.store import Principal
from gateway.core.scheduler import Backend
from gateway.ops.logs import AccessLog
from gateway.ops.metrics import Metrics
from gateway.ops.request_context import RequestContext
from gateway.transports.http.tokens import UNMETERED_ROUTES


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
    # One line per request, refusals sampled (gateway/ops/logs.py).
    access_log: AccessLog = field(default_factory=AccessLog)

    def unready_reason(self, health: Backend) -> str | None:
        """Why the gateway cannot serve now (Triton or a model not ready, the token store unreachable), or None."""
        if not health.ready:
            return health.reason
        if self.authenticator is not None and not self.authenticator.store_ok:
            return "the token store is unreachable"
        return None

    async def admit(self, context: RequestContext, authorization: str | None) -> Principal | None:
        """The caller, checked when authentication is on, with one request taken from its token's rate limit
        (token management excepted)."""
        if self.authenticator is None:
            return None
        principal = await self.authenticator.authenticate(authorization)
        context.token_id = principal.token_id
        if context.route not in UNMETERED_ROUTES:
            context.token_budget = self.authenticator.admit(principal)
        return principal

    def finish(self, context: RequestContext, status: str, rejection: str | None = None) -> None:
        """What every call leaves behind, once: the prompt tokens it reserved and did not use given back, its token's
        usage, the metrics and the access-log line. `rejection` is the transport's guess from its status, for a call
        whose error noted no kind on the context (gateway.core.errors.note_answered)."""
        served = _served(status)
        if context.token_budget is not None:
            context.token_budget.release()
        if self.authenticator is not None:
            self.authenticator.record(context, served)
        # The kind noted where the request was refused is the most specific: a transport knows only its status.
        self.metrics.request_finished(context, status, None if served else context.rejection or rejection)
        self.access_log.write(context, status)


def _served(status: str) -> bool:
    """An HTTP 2xx or gRPC OK (a stream whose items failed one by one still ends OK)."""
    return status == "OK" or (status.isdigit() and 200 <= int(status) < 300)

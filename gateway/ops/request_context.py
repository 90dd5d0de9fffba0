"""What the gateway knows about the request it is serving, reachable from anywhere on its path.

Each transport opens one RequestContext per call (HTTP in its middleware, gRPC in its method wrapper) and binds
it to a context variable, so that the core can add what only it knows (texts, tokens, time in queue and in
Triton) and every log line can name the request without the request being passed through every call.
"""

from __future__ import annotations

import contextvars
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

# A caller's own id is kept when it is safe to echo in a header and to write in a log line.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def request_id_from(value: str | None) -> str:
    """The caller's X-Request-Id when it is a plain token of at most 128 characters, else a new one."""
    if value is not None and _SAFE_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


class Settlement(Protocol):
    """Prompt tokens one inference holds until it says how many it used."""

    def settle(self, used: int) -> None: ...


class TokenBudget(Protocol):
    """A request's hold on its caller's prompt tokens a minute: given by gateway.auth, drawn on by gateway.core.metering.
    Declared here, where both meet, so that neither imports the other."""

    tokens_per_minute: int

    def try_reserve(self, amount: int) -> Settlement | None: ...

    def wait_s(self, amount: int) -> float: ...

    def release(self) -> None: ...


@dataclass
class RequestContext:
    request_id: str
    # "openai", "aleph_alpha" or "grpc": whose contract the call belongs to.
    contract: str
    # The route's template (/users/me/tokens/{token_id}) or the gRPC method, never the raw path: a bounded label.
    route: str
    started: float = field(default_factory=time.monotonic)
    token_id: int | None = None
    texts: int = 0
    tokens: int = 0
    queue_s: float = 0.0
    triton_s: float = 0.0
    # The caller's hold on its token's prompt tokens a minute, when the token has that limit: each inference reserves
    # its tokens there before any work (gateway/core/metering.py).
    token_budget: TokenBudget | None = None
    # Why the request was refused, set where its status alone cannot tell (a 429 is a rate limit or overload).
    rejection: str | None = None
    # The kind of the error it was answered with (gateway.core.errors.ErrorKind's value), for its access-log line.
    error_kind: str | None = None

    def add_usage(self, texts: int, tokens: int) -> None:
        self.texts += texts
        self.tokens += tokens

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("request_context", default=None)


def current() -> RequestContext | None:
    """The request being served, or None outside a request (start-up, background tasks)."""
    return _current.get()


def current_request_id() -> str:
    """The id of the request being served; empty outside a request."""
    context = _current.get()
    return context.request_id if context is not None else ""


def request_id_field() -> dict[str, str]:
    """{"request_id": ...} for an error body, so a caller can quote it when reporting the error; empty outside a request."""
    request_id = current_request_id()
    return {"request_id": request_id} if request_id else {}


def bind(context: RequestContext) -> contextvars.Token:
    return _current.set(context)


def unbind(token: contextvars.Token) -> None:
    _current.reset(token)

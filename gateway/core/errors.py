"""One error type for the whole gateway, by kind; each transport maps a kind to a status of its own
(gateway/transports/http/status.py, gateway/transports/grpc/status.py)."""

from __future__ import annotations

import math
from enum import Enum

from gateway.ops import request_context


class ErrorKind(Enum):
    VALIDATION = "validation"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    OVERLOADED = "overloaded"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    BACKEND = "backend"


# Seconds a client should wait before retrying when the error does not say; both official clients honour
# Retry-After on 429 and 503. Overload errors carry their own, estimated from the backlog.
RETRY_AFTER_S = {ErrorKind.OVERLOADED: 1, ErrorKind.UNAVAILABLE: 2, ErrorKind.DEADLINE_EXCEEDED: 1}


# What an error of each kind counts as in the rejections metric (gateway/ops/metrics.py, REJECTION_REASONS), whichever
# transport answers it: the kind says it, where a status cannot (a 503 is a deadline or Triton down; a
# RESOURCE_EXHAUSTED is overload, a rate limit or a too-large request). Absent: no refusal of the caller's request,
# but a failure of ours (BACKEND) or the caller leaving (CANCELLED).
REJECTION = {
    ErrorKind.VALIDATION: "invalid",
    ErrorKind.UNAUTHENTICATED: "unauthenticated",
    ErrorKind.FORBIDDEN: "forbidden",
    ErrorKind.NOT_FOUND: "invalid",
    ErrorKind.PAYLOAD_TOO_LARGE: "too_large",
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: "invalid",
    ErrorKind.OVERLOADED: "overloaded",
    ErrorKind.RATE_LIMITED: "rate_limited",
    ErrorKind.UNAVAILABLE: "unavailable",
    ErrorKind.DEADLINE_EXCEEDED: "deadline_exceeded",
}


class ServiceError(Exception):
    def __init__(self, kind: ErrorKind, message: str, param: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self._retry_after_s = retry_after_s

    @property
    def rejection(self) -> str | None:
        return REJECTION.get(self.kind)

    @property
    def retry_after_s(self) -> int | None:
        return self._retry_after_s if self._retry_after_s is not None else RETRY_AFTER_S.get(self.kind)


def note_answered(error: ServiceError) -> None:
    """Notes on the request being served the kind of its error, for its access-log line, and what it counts as in the
    metrics, unless something more specific was noted already (a rate limiter knows a too-large request from
    overload); each transport calls it where it turns the error into its status."""
    context = request_context.current()
    if context is None:
        return
    context.error_kind = error.kind.value
    if context.rejection is None:
        context.rejection = error.rejection


def rate_limited(message: str, wait_s: float) -> ServiceError:
    """A 429 with Retry-After: the whole seconds until the caller's limit lets it in (at least one)."""
    retry_after = max(1, math.ceil(wait_s))
    return ServiceError(ErrorKind.RATE_LIMITED, f"{message}; retry in {retry_after} s", retry_after_s=retry_after)


def invalid(message: str, param: str | None = None) -> ServiceError:
    return ServiceError(ErrorKind.VALIDATION, message, param)


def internal() -> ServiceError:
    """What a caller sees of an unexpected failure: the details go to the log, never to the answer."""
    return ServiceError(ErrorKind.BACKEND, "internal error; it has been logged")

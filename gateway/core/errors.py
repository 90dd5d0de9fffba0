"""One error type for the whole gateway; each transport maps its kind to a status of its own."""

from __future__ import annotations

from enum import Enum

import grpc


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


HTTP_STATUS = {
    ErrorKind.VALIDATION: 400,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.PAYLOAD_TOO_LARGE: 413,
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorKind.OVERLOADED: 429,
    ErrorKind.RATE_LIMITED: 429,
    ErrorKind.UNAVAILABLE: 503,
    # Not 504: both official clients retry a 503 after Retry-After, and the work is idempotent.
    ErrorKind.DEADLINE_EXCEEDED: 503,
    # nginx's "client closed request": logged and counted, never seen by the caller, who is gone.
    ErrorKind.CANCELLED: 499,
    ErrorKind.BACKEND: 500,
}

GRPC_STATUS = {
    ErrorKind.VALIDATION: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.PAYLOAD_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.BACKEND: grpc.StatusCode.INTERNAL,
}

# Seconds a client should wait before retrying when the error does not say; both official clients honour
# Retry-After on 429 and 503. Overload errors carry their own, estimated from the backlog.
RETRY_AFTER_S = {ErrorKind.OVERLOADED: 1, ErrorKind.UNAVAILABLE: 2, ErrorKind.DEADLINE_EXCEEDED: 1}


class ServiceError(Exception):
    def __init__(self, kind: ErrorKind, message: str, param: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self._retry_after_s = retry_after_s

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.kind]

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return GRPC_STATUS[self.kind]

    @property
    def retry_after_s(self) -> int | None:
        return self._retry_after_s if self._retry_after_s is not None else RETRY_AFTER_S.get(self.kind)


def invalid(message: str, param: str | None = None) -> ServiceError:
    return ServiceError(ErrorKind.VALIDATION, message, param)


def internal() -> ServiceError:
    """What a caller sees of an unexpected failure: the details go to the log, never to the answer."""
    return ServiceError(ErrorKind.BACKEND, "internal error; it has been logged")

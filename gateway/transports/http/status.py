"""The HTTP status of each kind of error: this transport's table (gRPC has its own, gateway/transports/grpc/status.py)."""

from __future__ import annotations

from gateway.core.errors import ErrorKind, ServiceError

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


def http_status(error: ServiceError) -> int:
    return HTTP_STATUS[error.kind]

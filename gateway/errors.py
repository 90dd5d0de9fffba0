"""One error type for the whole gateway; each transport maps its kind to a status of its own."""

from __future__ import annotations

from enum import Enum

import grpc


class ErrorKind(Enum):
    VALIDATION = "validation"
    NOT_FOUND = "not_found"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    BACKEND = "backend"


HTTP_STATUS = {
    ErrorKind.VALIDATION: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.PAYLOAD_TOO_LARGE: 413,
    ErrorKind.OVERLOADED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.BACKEND: 500,
}

GRPC_STATUS = {
    ErrorKind.VALIDATION: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.PAYLOAD_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.BACKEND: grpc.StatusCode.INTERNAL,
}

# Seconds a client should wait before retrying; both official clients honour Retry-After on 429 and 503.
RETRY_AFTER_S = {ErrorKind.OVERLOADED: 1, ErrorKind.UNAVAILABLE: 2}


class ServiceError(Exception):
    def __init__(self, kind: ErrorKind, message: str, param: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.kind]

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return GRPC_STATUS[self.kind]

    @property
    def retry_after_s(self) -> int | None:
        return RETRY_AFTER_S.get(self.kind)


def invalid(message: str, param: str | None = None) -> ServiceError:
    return ServiceError(ErrorKind.VALIDATION, message, param)

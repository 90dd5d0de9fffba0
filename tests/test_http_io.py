"""The request header lookup every HTTP request uses (fast tier: no server)."""

from starlette.requests import Request

from gateway.transports.http.messages import header


def _request(*headers: tuple[bytes, bytes]) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/", "headers": list(headers)})


def test_a_header_is_found_and_an_absent_one_is_none():
    request = _request((b"content-type", b"application/json"), (b"x-request-id", b"abc"))
    assert header(request, "x-request-id") == "abc"
    assert header(request, "content-type") == "application/json"
    assert header(request, "authorization") is None


def test_a_repeated_header_gives_its_first_value_as_starlette_does():
    request = _request((b"authorization", b"Bearer first"), (b"authorization", b"Bearer second"))
    assert header(request, "authorization") == "Bearer first" == request.headers.get("authorization")


def test_values_are_latin_1_as_http_allows():
    assert header(_request((b"x-note", "café".encode("latin-1"))), "x-note") == "café"

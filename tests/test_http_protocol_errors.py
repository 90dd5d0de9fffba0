"""Requests the HTTP parser refuses, bodies whose framing breaks, methods no route takes and protocol upgrades, in the
fast tier: the real protocol and app in-process (tests/http_harness.py). Every answer is JSON in the shape of the
contract at the request's path (a generic, OpenAI-shaped one when the path was never read), with the status HTTP
prescribes, counted in the metrics; none is uvicorn's plain-text 400 or an empty body.
"""

from __future__ import annotations

import json

import pytest


def openai_error(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"} and error["message"], error
    return error


def aleph_alpha_error(body: bytes) -> dict:
    error = json.loads(body)
    assert set(error) == {"error", "code", "field", "request_id"} and error["error"], error
    return error


# Each: the request's bytes, the status, and whether the path was read before the parser gave up.
MALFORMED_HEADS = {
    "a method with a character no token has": (b"G@T /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 400, False),
    "no space between method and target": (b"GET/v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 400, False),
    "a request line without a version": (b"GET /v1/models HTTP/1.x\r\nHost: x\r\n\r\n", 400, True),
    "a space inside the target": (b"GET /v1/mo dels HTTP/1.1\r\nHost: x\r\n\r\n", 400, True),
    "a control character in the target": (b"GET /v1/mo\x01dels HTTP/1.1\r\nHost: x\r\n\r\n", 400, False),
    "a byte that is not ASCII in the target": (b"GET /v1/\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400, False),
    "an absolute target that does not parse": (b"GET http://[bad/v1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, False),
    "a header name with a space": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n", 400, True),
    "a header line without a colon": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400, True),
    "an empty header name": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n: v\r\n\r\n", 400, True),
    "a space before the colon": (b"GET /v1/models HTTP/1.1\r\nHost : x\r\n\r\n", 400, True),
    "a NUL in a header value": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400, True),
    "a folded header line": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX: a\r\n folded\r\n\r\n", 400, True),
    "whitespace before the first header": (b"GET /v1/models HTTP/1.1\r\n Host: x\r\n\r\n", 400, True),
    "bare LF line ends": (b"GET /v1/models HTTP/1.1\nHost: x\n\n", 400, True),
    "bare CR line ends": (b"GET /v1/models HTTP/1.1\rHost: x\r\r", 400, True),
    "a Content-Length that is not a number": (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        400,
        True,
    ),
    "a negative Content-Length": (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, True),
    "a Content-Length past 2**64": (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        400,
        True,
    ),
    "two different Content-Lengths": (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        400,
        True,
    ),
    "Content-Length and Transfer-Encoding": (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        True,
    ),
    "chunked not the last coding": (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
        400,
        True,
    ),
    "an unknown method": (b"BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 501, False),
    "a lower-case method": (b"get /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 501, False),
    "CONNECT": (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501, False),
    "HTTP/1.2": (b"GET /v1/models HTTP/1.2\r\nHost: x\r\n\r\n", 505, True),
}


@pytest.mark.parametrize("name", MALFORMED_HEADS)
async def test_a_request_the_parser_refuses_is_answered_in_json_and_counted(gateway, name):
    request, status, path_read = MALFORMED_HEADS[name]
    connection = gateway.connect()
    connection.send(request)
    response = await connection.response()
    assert response.status == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close" and connection.transport.closed
    # /v1/... is the OpenAI contract's; before the path is read, the generic shape is the same one.
    error = openai_error(response.body)
    assert error["request_id"] == response.headers["x-request-id"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == {400: "malformed_request", 501: "method_not_implemented", 505: "http_version_not_supported"}[status]
    assert gateway.counted("unparsed", status) == 1
    contract = "openai" if path_read else "http"
    rejected = [s for f in gateway.metrics.registry.collect() for s in f.samples if s.name == "embed_gateway_requests_total"]
    assert [s.labels["contract"] for s in rejected] == [contract]


async def test_a_malformed_head_on_an_aleph_alpha_path_is_answered_in_its_shape(gateway):
    connection = gateway.connect()
    connection.send(b"POST /semantic_embed HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    response = await connection.response()
    assert response.status == 400
    error = aleph_alpha_error(response.body)
    assert error["code"] == "MALFORMED_REQUEST" and "Content-Length" in error["error"]
    assert gateway.counted("unparsed", 400) == 1


BROKEN_BODIES = {
    "a chunk size that is not hexadecimal": b"zz\r\nabc\r\n0\r\n\r\n",
    "a chunk not followed by CRLF": b"3\r\nabcX0\r\n\r\n",
    "a chunk size past 2**64": b"fffffffffffffffffff\r\n",
    "a control character in a chunk extension": b"3;\x01\r\nabc\r\n0\r\n\r\n",
    "a malformed trailer": b"0\r\nBad Trailer\r\n\r\n",
}


@pytest.mark.parametrize("name", BROKEN_BODIES)
@pytest.mark.parametrize("path", ["/v1/embeddings", "/embed"])
async def test_a_body_whose_framing_breaks_is_answered_400_by_its_route(gateway, name, path):
    connection = gateway.connect()
    connection.send(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    connection.send(BROKEN_BODIES[name])
    response = await connection.response()
    assert response.status == 400
    assert response.headers["connection"] == "close"
    if path == "/v1/embeddings":
        message = openai_error(response.body)["message"]
    else:
        message = aleph_alpha_error(response.body)["error"]
    assert message.startswith("malformed request body: ")
    assert gateway.counted(path, 400) == 1  # counted once, as the route's answer
    assert gateway.triton.calls == []


@pytest.mark.parametrize(
    ("method", "path", "allow", "shape"),
    [
        ("HEAD", "/v1/embeddings", "POST", openai_error),
        ("OPTIONS", "/v1/embeddings", "POST", openai_error),
        ("TRACE", "/semantic_embed", "POST", aleph_alpha_error),
        ("PROPFIND", "/embed", "POST", aleph_alpha_error),
        ("DELETE", "/v1/models", "GET, HEAD", openai_error),
        ("PUT", "/models_available", "GET, HEAD", aleph_alpha_error),
    ],
)
async def test_a_method_a_route_does_not_take_is_a_json_405_with_allow(gateway, method, path, allow, shape):
    connection = gateway.connect()
    connection.send(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    response = await connection.response(head_only=method == "HEAD")
    assert response.status == 405
    assert response.headers["allow"] == allow
    assert response.headers["content-type"] == "application/json"
    if method == "HEAD":
        # A HEAD answer never has a body (RFC 9110 9.3.2): its headers are those of the JSON error a GET would get.
        assert int(response.headers["content-length"]) > 0
        connection.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # the same connection goes on
        response = await connection.response()
        assert response.status == 405
    error = shape(response.body)
    assert allow in (error["message"] if shape is openai_error else error["error"])


@pytest.mark.parametrize(
    "upgrade",
    [
        # What curl --http2 sends on plain HTTP, its POST body included.
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
        b"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    ],
)
async def test_a_request_asking_to_upgrade_is_served_as_http_1_1_with_its_body(gateway, upgrade):
    body = json.dumps({"model": gateway.model.name, "input": ["hello world", "a second text"]}).encode()
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    connection = gateway.connect()
    connection.send(head + upgrade + b"\r\n" + body[:10])
    connection.send(body[10:])
    response = await connection.response()
    assert response.status == 200, response.body
    assert [item["index"] for item in response.json()["data"]] == [0, 1]
    assert "upgrade" not in response.headers
    # The connection was not handed to another protocol: the next request on it is served too.
    connection.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await connection.response()).status == 200
    connection.close()


async def test_many_pipelined_upgrade_requests_in_one_read_are_all_served(gateway):
    request = b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    connection = gateway.connect()
    connection.send(request * 1500)  # 1,260 of them fit in one header budget: more than the interpreter's recursion limit
    statuses = [(await connection.response()).status for _ in range(1500)]
    assert statuses == [404] * 1500
    connection.close()

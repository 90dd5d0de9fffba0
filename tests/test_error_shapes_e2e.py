"""Every error leaves in its contract's shape: unknown routes, wrong methods, undecodable gRPC messages,
failures nobody foresaw, and EmbedStream items that fail (answered per id while the stream goes on)."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from starlette.routing import Route

from gateway.core.errors import ErrorKind, ServiceError, internal, invalid
from gateway.ops.metrics import Metrics
from gateway.transports.grpc.server import add_servicer
from gateway.transports.grpc.servicer import EmbeddingServicer
from gateway.transports.grpc.servicer import contract_errors as grpc_contract_errors
from gateway.transports.http.app import build_app
from gateway.transports.http.messages import contract_errors as http_contract_errors
from gateway.transports.policy import RequestPolicy
from harness.servers import raw_http
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc

SERVICE = "/embedding.v1.EmbeddingService"
UNARY_METHODS = ["Embed", "SemanticEmbed", "BatchSemanticEmbed", "EmbedLayers", "Tokenize", "Detokenize", "ListModels"]
# Not a protobuf at all (a field tag with an unterminated varint), and a well-framed string field 1 that is not UTF-8.
GARBAGE = [b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x0a\x02\xff\xfe"]
SECRET = "secret-internal-detail-0x7f3a"


def http_call(service, method: str, path: str, body: bytes | None = None):
    return raw_http(service.http_port, method, path, body, timeout_s=60)


def assert_openai_error(body: bytes, code: str) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert error["code"] == code and isinstance(error["message"], str) and error["message"]
    return error


def assert_aleph_alpha_error(body: bytes, code: str) -> dict:
    error = json.loads(body)
    assert set(error) == {"error", "code", "field", "request_id"}
    assert error["code"] == code and isinstance(error["error"], str) and error["error"]
    return error


# --- HTTP: unknown paths and wrong methods, in the shape of the contract at the path ---------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/nothing-here"), ("POST", "/v1/embeddings/extra"), ("GET", "/v1")])
def test_unknown_openai_path_is_404_in_openai_shape(service, method, path):
    status, headers, body = http_call(service, method, path, b"{}" if method == "POST" else None)
    assert status == 404
    assert headers["content-type"] == "application/json"
    error = assert_openai_error(body, "not_found")
    assert error["type"] == "not_found_error"
    assert path in error["message"]


@pytest.mark.e2e
@pytest.mark.parametrize(("method", "path"), [("GET", "/nothing-here"), ("POST", "/semantic_embed/extra"), ("DELETE", "/")])
def test_unknown_aleph_alpha_path_is_404_in_aleph_alpha_shape(service, method, path):
    status, headers, body = http_call(service, method, path)
    assert status == 404
    assert headers["content-type"] == "application/json"
    assert path in assert_aleph_alpha_error(body, "NOT_FOUND")["error"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("GET", "/v1/embeddings", "POST"), ("PUT", "/embeddings", "POST"), ("POST", "/v1/models", "GET, HEAD")],
)
def test_wrong_method_on_openai_path_is_405_in_openai_shape(service, method, path, allow):
    status, headers, body = http_call(service, method, path, b"{}" if method != "GET" else None)
    assert status == 405
    assert sorted(headers["allow"].split(", ")) == allow.split(", ")
    assert headers["content-type"] == "application/json"
    error = assert_openai_error(body, "validation")
    assert error["type"] == "invalid_request_error"
    assert method in error["message"] and allow in error["message"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/semantic_embed", "POST"),
        ("DELETE", "/version", "GET, HEAD"),
        ("POST", "/health", "GET, HEAD"),
        ("PATCH", "/models/x/tokenizer", "GET, HEAD"),
    ],
)
def test_wrong_method_on_aleph_alpha_path_is_405_in_aleph_alpha_shape(service, method, path, allow):
    status, headers, body = http_call(service, method, path)
    assert status == 405
    assert sorted(headers["allow"].split(", ")) == allow.split(", ")
    assert headers["content-type"] == "application/json"
    assert method in assert_aleph_alpha_error(body, "VALIDATION")["error"]


# --- HTTP: whatever no route foresaw is a JSON 500 in the contract's shape that names nothing inside -----------------


class _Exploding:
    """A service whose every attribute fails, as an unforeseen bug in the core would."""

    def __getattr__(self, name):
        raise RuntimeError(f"{SECRET} ({name})")


async def asgi_call(app, method: str, path: str, body: bytes = b""):
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # the client stays connected

    async def send(message):
        sent.append(message)

    raised = None
    try:
        await app(scope, receive, send)
    except Exception as error:  # ServerErrorMiddleware answers, then re-raises for the server to log
        raised = error
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, body, raised


OPENAI_BODY = json.dumps({"model": "m", "input": ["hello"]}).encode()
ALEPH_ALPHA_BODY = json.dumps({"model": "m", "prompt": "hello", "representation": "symmetric"}).encode()


@pytest.mark.parametrize(
    ("method", "path", "body", "shape"),
    [
        ("POST", "/v1/embeddings", OPENAI_BODY, "openai"),
        ("POST", "/embeddings", OPENAI_BODY, "openai"),
        ("GET", "/v1/models", b"", "openai"),
        ("POST", "/semantic_embed", ALEPH_ALPHA_BODY, "aleph_alpha"),
        ("GET", "/models_available", b"", "aleph_alpha"),
        ("POST", "/tokenize", json.dumps({"model": "m", "prompt": "hi"}).encode(), "aleph_alpha"),
        ("GET", "/health", b"", "aleph_alpha"),
    ],
)
async def test_an_unexpected_exception_is_a_json_500_in_the_contract_shape(caplog, method, path, body, shape):
    app = build_app(_Exploding(), 4 * 1024 * 1024, RequestPolicy(None, Metrics()))
    with caplog.at_level(logging.ERROR, logger="gateway"):
        status, headers, content, raised = await asgi_call(app, method, path, body)
    assert raised is None  # answered by the route's contract_errors, not by a crash
    assert status == 500
    assert headers["content-type"] == "application/json"
    assert SECRET not in content.decode() and "RuntimeError" not in content.decode()
    if shape == "openai":
        error = assert_openai_error(content, "backend")
        assert (error["type"], error["message"]) == ("server_error", internal().message)
    else:
        assert assert_aleph_alpha_error(content, "BACKEND")["error"] == internal().message
    # The details are in the log, with the traceback.
    logged = [r for r in caplog.records if r.name == "gateway" and r.exc_info]
    assert logged and SECRET in str(logged[-1].exc_info[1])


@pytest.mark.parametrize(("path", "shape"), [("/v1/boom", "openai"), ("/boom", "aleph_alpha")])
async def test_an_exception_escaping_a_route_is_a_json_500_in_the_contract_shape(caplog, path, shape):
    async def boom(request):
        raise RuntimeError(SECRET)

    app = build_app(_Exploding(), 1024, RequestPolicy(None, Metrics()))
    app.app.app.router.routes.append(Route(path, boom, methods=["GET"]))  # the Starlette app behind StaticRoutes
    with caplog.at_level(logging.ERROR, logger="gateway"):
        status, headers, content, raised = await asgi_call(app, "GET", path)
    assert isinstance(raised, RuntimeError)  # re-raised after the answer, for the server to log
    assert status == 500
    assert headers["content-type"] == "application/json"
    assert SECRET not in content.decode()
    if shape == "openai":
        assert assert_openai_error(content, "backend")["message"] == internal().message
    else:
        assert assert_aleph_alpha_error(content, "BACKEND")["error"] == internal().message


async def test_http_contract_errors_let_cancellation_through():
    @http_contract_errors(lambda error: pytest.fail("rendered a cancellation"))
    async def cancelled(request):
        raise asyncio.CancelledError()

    with pytest.raises(asyncio.CancelledError):
        await cancelled(object())


# --- gRPC: undecodable messages are INVALID_ARGUMENT --------------------------------------------------------------------


@pytest.fixture
async def channel(service):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        yield channel


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("method", "garbage"),
    # ListModelsRequest has no field 1, so a string there is an unknown field that decodes fine.
    [
        pytest.param(m, g, id=f"{m}-{name}")
        for m in UNARY_METHODS
        for g, name in zip(GARBAGE, ["not-protobuf", "bad-utf8"])
        if (m, name) != ("ListModels", "bad-utf8")
    ],
)
async def test_undecodable_unary_request_is_invalid_argument(channel, model_name, method, garbage):
    call = channel.unary_unary(f"{SERVICE}/{method}", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(garbage, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert f"embedding.v1.{method}Request" in raised.value.details()
    assert "Exception" not in raised.value.details() and "Error" not in raised.value.details()
    # The server keeps serving.
    stub = pb_grpc.EmbeddingServiceStub(channel)
    assert len((await stub.Embed(pb.EmbedRequest(model=model_name, inputs=["still fine"]))).embeddings) == 1


@pytest.mark.e2e
async def test_undecodable_stream_message_is_invalid_argument(channel, model_name):
    call = channel.stream_stream(f"{SERVICE}/EmbedStream", request_serializer=None, response_deserializer=None)

    async def messages():
        yield pb.EmbedStreamRequest(id="1", text="fine", model=model_name).SerializeToString()
        yield GARBAGE[0]

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call(messages(), timeout=30):
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "embedding.v1.EmbedStreamRequest" in raised.value.details()


# --- EmbedStream: every id is answered, with its vector or its error, and the stream ends OK -------------------------


@pytest.mark.e2e
async def test_embed_stream_answers_every_id_with_a_vector_or_an_error(channel, model_name, manifest):
    stub = pb_grpc.EmbeddingServiceStub(channel)
    dims = manifest["dimensions"]
    sent = []
    for i in range(24):
        kind = ["good", "too_many_dims", "good", "zero_dims", "good", "empty", "unknown_model", "good_64"][i % 8]
        request = pb.EmbedStreamRequest(id=f"{kind}-{i}", text=f"text number {i}", model=model_name)
        if kind == "too_many_dims":
            request.dimensions = dims + 1
        elif kind == "zero_dims":
            request.dimensions = 0
        elif kind == "empty":
            request.text = ""
        elif kind == "unknown_model":
            request.model = "no-such-model"
        elif kind == "good_64":
            request.dimensions = 64
        sent.append(request)

    async def requests_():
        for request in sent:
            yield request

    call = stub.EmbedStream(requests_())
    replies = [reply async for reply in call]
    assert await call.code() == grpc.StatusCode.OK
    assert sorted(r.id for r in replies) == sorted(r.id for r in sent)  # each id exactly once
    by_id = {r.id: r for r in replies}
    good = [r for r in sent if r.id.startswith("good")]
    expected = await stub.Embed(pb.EmbedRequest(model=model_name, inputs=[r.text for r in good]))
    for request, embedding in zip(good, expected.embeddings):
        reply = by_id[request.id]
        assert not reply.HasField("error"), reply.error
        width = 64 if request.id.startswith("good_64") else dims
        assert len(reply.embedding.values) == width
        want = np.array(embedding.values[:width])
        want /= np.linalg.norm(want)
        np.testing.assert_allclose(reply.embedding.values, want, atol=1e-5)
    expected_errors = {
        "too_many_dims": ("validation", "dimensions"),
        "zero_dims": ("validation", "dimensions"),
        "empty": ("validation", "text"),
        "unknown_model": ("not_found", "model"),
    }
    for request in sent:
        kind = request.id.rsplit("-", 1)[0]
        if kind in expected_errors:
            reply = by_id[request.id]
            assert not reply.HasField("embedding")
            assert (reply.error.code, reply.error.field) == expected_errors[kind], reply.error
            assert reply.error.message


# --- gRPC in process: unforeseen failures are INTERNAL (logged), and a failing batch never ends a stream --------------


class _FakeService:
    """Just what EmbeddingServicer touches; embed() fails as told by the texts it gets."""

    def __init__(self, dims: int = 4):
        self.dims = dims
        self.calls = 0

    def models(self):
        return [SimpleNamespace(max_batch_size=8)]

    async def embed(self, call, *args, **kwargs):
        self.calls += 1
        if any(text == "" for text in call.texts):
            raise invalid("'text[0]' must not be empty", "text")
        if any(text.startswith("crash") for text in call.texts):
            raise RuntimeError(SECRET)
        if call.model != "m":
            raise ServiceError(ErrorKind.NOT_FOUND, f"model '{call.model}' is not served here", "model")
        vectors = np.ones((len(call.texts), self.dims), dtype=np.float32)
        model = SimpleNamespace(name="m", model_version="v")
        return SimpleNamespace(embeddings=vectors, token_counts=np.full(len(call.texts), 3), model=model)

    def deadline(self, *args, **kwargs):
        return None

    async def tokenize(self, model, prompt, *args, **kwargs):
        raise ZeroDivisionError(SECRET)


@pytest.fixture
async def fake_stub():
    server = grpc.aio.server()
    add_servicer(EmbeddingServicer(_FakeService()), server, RequestPolicy(None, Metrics()))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.EmbeddingServiceStub(channel)
    finally:
        await server.stop(0)


@pytest.mark.parametrize(
    ("rpc", "request_"),
    [("Embed", pb.EmbedRequest(model="m", inputs=["crash"])), ("Tokenize", pb.TokenizeRequest(model="m", prompt="hi"))],
)
async def test_an_unexpected_exception_is_internal_with_a_generic_message(fake_stub, caplog, rpc, request_):
    with caplog.at_level(logging.ERROR, logger="gateway"), pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(fake_stub, rpc)(request_, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert raised.value.details() == internal().message
    assert any(r.name == "gateway" and r.exc_info for r in caplog.records)


async def test_a_service_error_keeps_its_status_and_field(fake_stub):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await fake_stub.Embed(pb.EmbedRequest(model="other", inputs=["x"]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(raised.value.trailing_metadata())["field"] == "model"


async def test_a_stream_batch_that_crashes_is_answered_per_id_and_the_stream_ends_ok(fake_stub, caplog):
    texts = {"a": "fine", "b": "crash now", "c": "", "d": "also fine", "e": "crash again", "f": "last"}

    async def requests_():
        for id_, text in texts.items():
            yield pb.EmbedStreamRequest(id=id_, text=text, model="m")
        yield pb.EmbedStreamRequest(id="g", text="elsewhere", model="other")

    with caplog.at_level(logging.ERROR, logger="gateway"):
        call = fake_stub.EmbedStream(requests_(), timeout=10)
        replies = {r.id: r async for r in call}
    assert await call.code() == grpc.StatusCode.OK
    assert sorted(replies) == ["a", "b", "c", "d", "e", "f", "g"]
    for id_ in ("b", "e"):
        assert (replies[id_].error.code, replies[id_].error.message) == ("backend", internal().message)
    assert (replies["c"].error.code, replies["c"].error.field) == ("validation", "text")
    assert (replies["g"].error.code, replies["g"].error.field) == ("not_found", "model")
    # A crash fails its whole batch; an invalid text fails only itself.
    crashed_with = {id_ for id_, r in replies.items() if r.error.code == "backend"}
    assert {"b", "e"} <= crashed_with
    for id_ in {"a", "d", "f"} - crashed_with:
        assert list(replies[id_].embedding.values) == [1.0] * 4
    assert SECRET not in str([r.error.message for r in replies.values()])
    assert any(r.name == "gateway" and r.exc_info for r in caplog.records)


async def test_grpc_contract_errors_let_abort_and_cancellation_through():
    class Context:
        async def abort(self, code, details, metadata=()):
            raise grpc.aio.AbortError()

    @grpc_contract_errors
    async def aborts(self, request, context):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "mine")

    @grpc_contract_errors
    async def cancelled(self, request, context):
        raise asyncio.CancelledError()

    with pytest.raises(grpc.aio.AbortError):
        await aborts(None, None, Context())
    with pytest.raises(asyncio.CancelledError):
        await cancelled(None, None, Context())

"""The hardening of the HTTP and gRPC fronts, against the real gateway and Triton (the session's service): malformed
HTTP answered in JSON over real sockets, a real curl --http2 served, and validation the same over HTTP, gRPC and the
real clients. The fast tier covers each case (test_http_protocol_errors.py, test_request_validation.py); this proves
the processes as started behave so."""

from __future__ import annotations

import json
import socket
import subprocess

import grpc
import openai
import pytest
from aleph_alpha_client import Client, EmbeddingRequest, Prompt, SemanticEmbeddingRequest, SemanticRepresentation

from harness.servers import raw_http
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e


def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """What the server answers to raw bytes, read until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(
    ("request_", "status", "code"),
    [
        (b"G@T /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n", 400, "malformed_request"),
        (b"BREW /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n", 501, "method_not_implemented"),
        (b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX: a\x00b\r\n\r\n", 400, "malformed_request"),
        (b"GET /v1/models HTTP/1.7\r\nHost: localhost\r\n\r\n", 505, "http_version_not_supported"),
    ],
)
def test_a_request_the_parser_refuses_gets_json(service, request_, status, code):
    got, headers, body = exchange(service.http_port, request_)
    assert got == status and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == code and error["request_id"] == headers["x-request-id"]


def test_a_broken_chunked_body_gets_a_400_in_the_contract_shape(service):
    head = b"POST /embed HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, headers, body = exchange(service.http_port, head + b"zz\r\n{}\r\n0\r\n\r\n")
    assert status == 400 and headers["connection"] == "close"
    error = json.loads(body)
    assert error["code"] == "VALIDATION" and error["error"].startswith("malformed request body")


def test_head_on_a_post_route_is_a_405_with_allow_and_json_headers(service):
    status, headers, body = exchange(
        service.http_port, b"HEAD /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    assert (status, headers["allow"], headers["content-type"]) == (405, "POST", "application/json")
    assert int(headers["content-length"]) > 0 and body == b""  # a HEAD answer has no body (RFC 9110 9.3.2)


def test_curl_http2_on_plain_http_is_served_with_its_body(service, model_name):
    """curl --http2 asks to upgrade to h2c on every plain-HTTP request, POST bodies included."""
    done = subprocess.run(
        [
            "curl",
            "-s",
            "--http2",
            "-w",
            "\n%{http_code}",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps({"model": model_name, "input": ["upgrade me", "not"]}),
            f"{service.http_url}/v1/embeddings",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    body, status = done.stdout.rsplit("\n", 1)
    assert status == "200", body
    assert [item["index"] for item in json.loads(body)["data"]] == [0, 1]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "all-minilm-l6-v2", "input": "a", "input": "b"}', "input"),
        (b'{"model": "all-minilm-l6-v2", "input": "a", "truncate": "yes"}', "truncate"),
        (b'{"model": "all-minilm-l6-v2", "input": "a", "truncate": 1}', "truncate"),
        (b'{"model": "all-minilm-l6-v2", "input": ["ok", " \\t\\n "]}', "input"),
    ],
)
def test_ambiguous_or_empty_openai_input_is_a_400_naming_the_field(service, body, param):
    status, _, content = raw_http(
        service.http_port, "POST", "/v1/embeddings", body, {"Content-Type": "application/json", "Host": "localhost"}
    )
    assert status == 400 and json.loads(content)["error"]["param"] == param


def test_the_real_clients_get_a_400_for_nothing_to_embed_and_are_served_otherwise(service, model_name):
    client = openai.OpenAI(base_url=f"{service.http_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model=model_name, input=["fine", "\u200b\n"])
    assert raised.value.body["param"] == "input"
    assert len(client.embeddings.create(model=model_name, input=["fine", " padded "]).data) == 2

    aleph_alpha = Client(token="any", host=service.http_url)  # a 400 is never retried
    with pytest.raises(ValueError):
        blank = SemanticEmbeddingRequest(prompt=Prompt.from_text("  "), representation=SemanticRepresentation.Query)
        aleph_alpha.semantic_embed(blank, model=model_name)
    request = EmbeddingRequest(prompt=Prompt.from_text("hello"), layers=[-1, 0], pooling=["mean", "max"])
    layers = aleph_alpha.embed(request, model=model_name)
    assert set(layers.embeddings) == {("layer_-1", "mean"), ("layer_-1", "max"), ("layer_0", "mean"), ("layer_0", "max")}


@pytest.fixture
async def stub(service):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        yield pb_grpc.EmbeddingServiceStub(channel)


async def test_grpc_refuses_what_http_refuses_naming_the_field(stub, model_name):
    cases = [
        (stub.Embed, pb.EmbedRequest(model=model_name, inputs=["fine", " \n"]), "inputs"),
        (
            stub.SemanticEmbed,
            pb.SemanticEmbedRequest(model=model_name, prompt=pb.Prompt(items=[pb.PromptItem(text="\u200b")])),
            "prompt",
        ),
        (
            stub.EmbedLayers,
            pb.EmbedLayersRequest(
                model=model_name, prompt=pb.Prompt(items=[pb.PromptItem(text="hi")]), layers=[-1, 6], poolings=[pb.POOLING_MEAN]
            ),
            "layers",
        ),
        (
            stub.EmbedLayers,
            pb.EmbedLayersRequest(
                model=model_name,
                prompt=pb.Prompt(items=[pb.PromptItem(text="hi")]),
                layers=[0],
                poolings=[pb.POOLING_MEAN, pb.POOLING_MEAN],
            ),
            "pooling",
        ),
    ]
    for method, request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await method(request)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
        assert dict(raised.value.trailing_metadata())["field"] == field


async def test_grpc_stream_answers_a_text_with_nothing_visible_with_its_own_error(stub, model_name):
    def items():
        yield pb.EmbedStreamRequest(id="blank", text="\t \r\n", model=model_name)
        yield pb.EmbedStreamRequest(id="fine", text="a sentence", model=model_name)

    replies = {reply.id: reply async for reply in stub.EmbedStream(items())}
    assert replies["blank"].HasField("error") and replies["blank"].error.field == "text"
    assert replies["fine"].HasField("embedding")

"""Property-based fuzzing of every HTTP route and gRPC method of the real gateway (real Triton behind it).

Bodies are mostly valid requests with some fields mutated (wrong types, huge or negative numbers, empty lists,
unicode, nulls, extra fields), plus invalid JSON and wrong content types; random paths and methods; random
protobuf messages and raw bytes on gRPC. Whatever comes in, the service must answer in its contract: never a
5xx (but 503 with Retry-After), every HTTP error a JSON body in the shape of the contract at its path, gRPC
only the codes a client can act on. Afterwards it must still embed a known text as before.

Bounded for a 2-core CPU box (about a minute): short texts, few examples per route, no example database.
"""

from __future__ import annotations

import json
import math
from urllib.parse import quote, urlencode

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.servers import raw_http
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(FUZZ, max_examples=120)

KNOWN_TEXT = "The cat sits outside."
VOCAB = 30522
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
GRPC_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
}
STREAM_ERROR_CODES = {"validation", "not_found", "payload_too_large", "overloaded", "unavailable"}
SERVICE = "/embedding.v1.EmbeddingService"
UNARY_METHODS = ["Embed", "SemanticEmbed", "BatchSemanticEmbed", "EmbedLayers", "Tokenize", "Detokenize", "ListModels"]


# --- value strategies ---------------------------------------------------------------------------------------------

# Empty, control, lone surrogates (valid JSON escapes, not valid UTF-8), multi-byte, special tokens, over the token limit.
SPECIAL_TEXTS = ["", " ", "\x00", "\n\t\r", "\ud800", "a\udfffb", "é", "🙂🙂", "\u202e\u200b", "[CLS] [SEP] [PAD]"]
SPECIAL_TEXTS.append("word " * 260)
NORMAL_TEXTS = ["hello", "The cat sits outside.", "A man is playing guitar.", "x"]
short_text = st.sampled_from(NORMAL_TEXTS) | st.text(max_size=16) | st.sampled_from(SPECIAL_TEXTS)
huge_int = st.sampled_from([-(2**63), -(2**31), -1, 2**31, 2**32, 2**63, 2**64 + 1, 10**30])
small_int = st.integers(min_value=-3, max_value=400)
token_id = st.integers(min_value=0, max_value=VOCAB - 1) | st.integers(min_value=-5, max_value=VOCAB + 5) | huge_int
scalars = st.none() | st.booleans() | small_int | huge_int | st.floats(allow_nan=True, allow_infinity=True) | short_text
wild = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def models(model_name: str):
    # Hypothesis draws an index into sampled_from about uniformly, where one_of favours its last branches.
    return st.sampled_from([model_name] * 20 + ["", "no-such-model", "ALL-MINILM-L6-V2", "é\u0000", "\ud800"])


factor = (
    st.sampled_from([0.0, 0.1, 1.0, 10.0, 1e30, 1e300]) | st.floats(allow_nan=True, allow_infinity=True) | small_int | huge_int
)
text_control = st.fixed_dictionaries(
    {"start": small_int | huge_int, "length": small_int | huge_int, "factor": factor},
    optional={"token_overlap": st.sampled_from(["partial", "complete", "most", "", None])},
)
token_control = st.fixed_dictionaries({"index": small_int | huge_int, "factor": factor})


def aleph_alpha_item():
    return st.fixed_dictionaries(
        {
            "type": st.sampled_from(["text", "token_ids", "image", "video", ""]),
            "data": short_text | st.lists(token_id, max_size=6) | wild,
        },
        optional={"controls": st.lists(text_control | token_control | wild, max_size=3) | st.none()},
    )


POOLINGS = ["mean", "weighted_mean", "max", "last_token", "abs_max"]
aleph_alpha_prompt = short_text | st.lists(aleph_alpha_item(), max_size=3)


def route_fields(model_name: str) -> dict[str, tuple[dict, dict]]:
    """Per route: a valid base body, and a plausible strategy for each field it knows (base or optional)."""
    model = models(model_name)
    openai_fields = {
        "model": model,
        "input": short_text
        | st.lists(short_text, max_size=4)
        | st.lists(token_id, max_size=6)
        | st.lists(st.lists(token_id, max_size=5), max_size=3),
        "encoding_format": st.sampled_from(["float", "base64"] * 2 + ["int8", "", "FLOAT"]),
        "dimensions": st.integers(min_value=1, max_value=384) | small_int | huge_int,
        "user": short_text,
        "truncate": st.booleans() | st.none(),
    }
    shared = {
        "model": model,
        "hosting": st.sampled_from([None, "aleph-alpha"] * 2 + ["elsewhere", ""]),
        "normalize": st.booleans(),
        "contextual_control_threshold": st.none() | st.floats(allow_nan=True, allow_infinity=True),
        "control_log_additive": st.booleans() | st.none(),
    }
    semantic = {
        **shared,
        "prompt": aleph_alpha_prompt,
        "representation": st.sampled_from(["symmetric", "document", "query"] * 2 + ["sideways", ""]),
        "compress_to_size": st.sampled_from([None, 128] * 2 + [64, 0, -1]) | huge_int,
    }
    openai_base = {"model": model_name, "input": ["hello world"]}
    return {
        "/v1/embeddings": (openai_base, openai_fields),
        "/embeddings": (openai_base, openai_fields),
        "/semantic_embed": ({"model": model_name, "prompt": "hello", "representation": "symmetric"}, semantic),
        "/batch_semantic_embed": (
            {"model": model_name, "prompts": ["hello", [{"type": "text", "data": "hi"}]], "representation": "query"},
            {**{k: v for k, v in semantic.items() if k != "prompt"}, "prompts": st.lists(aleph_alpha_prompt, max_size=4)},
        ),
        "/embed": (
            {"model": model_name, "prompt": "hello", "layers": [-1], "pooling": ["mean"]},
            {
                **shared,
                "prompt": aleph_alpha_prompt,
                "layers": st.lists(st.integers(min_value=-6, max_value=6), min_size=1, max_size=3)
                | st.lists(st.integers(min_value=-9, max_value=9) | huge_int, max_size=4),
                "pooling": st.lists(st.sampled_from(POOLINGS), min_size=1, max_size=3, unique=True)
                | st.lists(st.sampled_from([*POOLINGS, "median", ""]), max_size=4),
                "tokens": st.booleans() | st.none(),
                "type": st.none() | short_text,
            },
        ),
        "/tokenize": (
            {"model": model_name, "prompt": "hello", "tokens": True, "token_ids": True},
            {"model": model, "prompt": short_text, "tokens": st.booleans(), "token_ids": st.booleans()},
        ),
        "/detokenize": (
            {"model": model_name, "token_ids": [7592, 2088]},
            {"model": model, "token_ids": st.lists(token_id, max_size=8)},
        ),
    }


@st.composite
def mutated_body(draw, base: dict, fields: dict) -> dict:
    """The base body with a few fields (none to three) dropped, set to a plausible value or to anything; maybe extra fields."""
    body = dict(base)
    count = min(len(fields), draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3])))
    for name in draw(st.lists(st.sampled_from(sorted(fields)), min_size=count, max_size=count, unique=True)):
        action = draw(st.sampled_from(["plausible"] * 4 + ["drop", "wild"]))
        if action == "drop":
            body.pop(name, None)
        elif action == "plausible":
            body[name] = draw(fields[name])
        else:
            body[name] = draw(wild)
    if draw(st.integers(min_value=0, max_value=3)) == 0:
        body.update(draw(st.dictionaries(st.text(max_size=8), wild, max_size=2)))
    return body


CONTENT_TYPES = ["application/json"] * 6 + [None, "text/plain", "application/x-www-form-urlencoded", "application/json; x=y"]


@st.composite
def encoded(draw, body: dict) -> tuple[bytes, dict[str, str]]:
    """The body as bytes: mostly JSON, sometimes broken JSON, another JSON type, a form or nothing; any content type."""
    how = draw(st.sampled_from(["json"] * 15 + ["truncated", "garbage", "empty", "other_json", "form"]))
    text = json.dumps(body, allow_nan=True)
    if how == "json":
        data = text.encode("utf-8", "surrogatepass")
    elif how == "truncated":
        data = text[: draw(st.integers(min_value=0, max_value=max(0, len(text) - 1)))].encode("utf-8", "surrogatepass")
    elif how == "garbage":
        data = draw(st.binary(max_size=48))
    elif how == "empty":
        data = b""
    elif how == "other_json":
        data = json.dumps(draw(wild), allow_nan=True).encode("utf-8", "surrogatepass")
    else:
        raw = lambda value: str(value).encode("utf-8", "surrogatepass")  # noqa: E731
        data = urlencode({raw(k): raw(v) for k, v in body.items()}).encode()
    headers = {}
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type is not None:
        headers["Content-Type"] = content_type
    return data, headers


# --- HTTP ---------------------------------------------------------------------------------------------------------


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path == "/embeddings" or path.startswith("/embeddings/")


def request(service, method: str, target: str, body: bytes | None = None, headers: dict | None = None):
    return raw_http(service.http_port, method, target, body, headers)


def check_http(method: str, path: str, status: int, headers: dict, body: bytes) -> None:
    """The contract of every answer, whatever the request: no 5xx but 503 + Retry-After, errors in JSON of the path's shape."""
    where = f"{method} {path!r} -> {status} {body[:300]!r}"
    assert status < 500 or (status == 503 and "retry-after" in headers), where
    if 300 <= status < 400:  # Starlette's trailing-slash redirect to the route without it
        assert "location" in headers, where
        return
    if method == "HEAD":
        return
    if status < 300:
        if path != "/version":
            json.loads(body)
        return
    assert headers.get("content-type") == "application/json", where
    data = json.loads(body)
    if is_openai_path(path):
        assert set(data) == {"error"}, where
        error = data["error"]
        assert set(error) == {"message", "type", "param", "code", "request_id"}, where
        assert error["request_id"] == headers["x-request-id"], where
        assert isinstance(error["message"], str) and error["message"], where
        assert isinstance(error["type"], str) and isinstance(error["code"], str), where
        assert error["param"] is None or isinstance(error["param"], str), where
    else:
        assert set(data) == {"error", "code", "field", "request_id"}, where
        assert data["request_id"] == headers["x-request-id"], where
        assert isinstance(data["error"], str) and data["error"], where
        assert isinstance(data["code"], str) and data["code"].isupper(), where
        assert data["field"] is None or isinstance(data["field"], str), where
    assert "Traceback" not in data.__repr__(), where


def embed_http(service, model_name: str, text: str) -> np.ndarray:
    body = json.dumps({"model": model_name, "input": [text]}).encode()
    status, _, content = request(service, "POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
    assert status == 200, content
    return np.array(json.loads(content)["data"][0]["embedding"], dtype=np.float64)


@pytest.fixture(scope="module")
def reference(service, model_name) -> np.ndarray:
    """The known text's vector before any fuzzing."""
    return embed_http(service, model_name, KNOWN_TEXT)


POST_ROUTES = ["/v1/embeddings", "/embeddings", "/semantic_embed", "/batch_semantic_embed", "/embed", "/tokenize", "/detokenize"]
ALEPH_ALPHA_NICE = {"/semantic_embed", "/batch_semantic_embed", "/embed"}


def test_reference_vector_is_taken_first(reference):
    assert reference.shape == (384,) and math.isclose(np.linalg.norm(reference), 1.0, rel_tol=1e-4)


@pytest.mark.parametrize("path", POST_ROUTES)
@FUZZ
@given(data=st.data())
def test_post_routes_answer_in_their_contract(service, model_name, path, data):
    base, fields = route_fields(model_name)[path]
    body = data.draw(mutated_body(base, fields), label="body")
    payload, headers = data.draw(encoded(body), label="payload")
    target = path
    if path in ALEPH_ALPHA_NICE:
        nice = data.draw(st.sampled_from([None, None, "true", "false", "TRUE", "maybe", ""]), label="nice")
        if nice is not None:
            target += "?" + urlencode({"nice": nice})
    timeouts = [None] * 12 + ["0", "-1", "nan", "inf", "abc", "", "1e-9", "0.001", "5", "1e308"]
    timeout = data.draw(st.sampled_from(timeouts), label="timeout")
    if timeout is not None:
        headers["X-Request-Timeout"] = timeout
    status, response_headers, content = request(service, "POST", target, payload, headers)
    check_http("POST", path, status, response_headers, content)


GET_ROUTES = ["/v1/models", "/models_available", "/version", "/health", "/models/{model}/tokenizer"]


@pytest.mark.parametrize("path", GET_ROUTES)
@FEW
@given(data=st.data())
def test_get_routes_answer_in_their_contract(service, model_name, path, data):
    if "{model}" in path:
        path = path.format(model=data.draw(models(model_name) | short_text, label="model").replace("/", "_"))
    query = data.draw(st.none() | st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2), label="query")
    target = quote(path.encode("utf-8", "surrogatepass")) + ("?" + urlencode(query) if query else "")
    status, headers, content = request(service, "GET", target)
    check_http("GET", path, status, headers, content)
    if path == "/version" and status == 200:
        assert headers["content-type"].startswith("text/plain") and content.decode()


KNOWN_PATHS = POST_ROUTES + GET_ROUTES[:-1] + ["/models/all-minilm-l6-v2/tokenizer", "/", "/v1", "/v1/", "/models"]
path_segment = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/?#"), max_size=10)


@st.composite
def random_path(draw) -> str:
    how = draw(st.sampled_from(["known", "known_plus", "random", "prefixed"]))
    if how == "known":
        return draw(st.sampled_from(KNOWN_PATHS))
    if how == "known_plus":
        return draw(st.sampled_from(KNOWN_PATHS)).rstrip("/") + "/" + draw(path_segment)
    segments = draw(st.lists(path_segment, min_size=1, max_size=4))
    prefix = draw(st.sampled_from(["", "/v1", "/embeddings", "/models"])) if how == "prefixed" else ""
    return prefix + "/" + "/".join(segments)


@settings(FUZZ, max_examples=800)
@given(data=st.data())
def test_any_path_and_method_answers_in_the_contract_of_the_path(service, model_name, data):
    method = data.draw(st.sampled_from(METHODS), label="method")
    path = data.draw(random_path(), label="path")
    body, headers = (None, {})
    if method in ("POST", "PUT", "PATCH", "DELETE") and data.draw(st.booleans(), label="with_body"):
        any_contract = {"model": model_name, "input": "hi", "prompt": "hi", "representation": "symmetric"}
        body, headers = data.draw(encoded(any_contract), label="payload")
    status, response_headers, content = request(service, method, quote(path, safe="/"), body, headers)
    check_http(method, path, status, response_headers, content)
    if status == 405:
        assert response_headers["allow"], path


# --- gRPC ---------------------------------------------------------------------------------------------------------

uint32 = st.integers(min_value=0, max_value=2**32 - 1) | st.sampled_from([0, 1, 64, 128, 383, 384, 385])
dims = st.integers(min_value=1, max_value=384) | uint32
open_enum = st.integers(min_value=-3, max_value=8)


def enum(known: int):
    """Mostly a value the server knows (0..known-1), sometimes one it does not."""
    return st.integers(min_value=0, max_value=known - 1) | st.integers(min_value=0, max_value=known - 1) | open_enum


# Protobuf strings are UTF-8, so no lone surrogates here.
PROTO_TEXTS = [t for t in SPECIAL_TEXTS if not any("\ud800" <= c <= "\udfff" for c in t)]
proto_text = st.sampled_from(NORMAL_TEXTS) | st.text(max_size=16) | st.sampled_from(PROTO_TEXTS)


def grpc_models(model_name: str):
    return st.sampled_from([model_name] * 15 + ["", "no-such-model", "é\u0000"])


def maybe(strategy):
    return st.none() | strategy


grpc_factor = st.sampled_from([0.0, 0.1, 1.0, 10.0, 1e30]) | st.floats(allow_nan=True, allow_infinity=True)
grpc_text_control = st.builds(
    pb.TextControl,
    start=st.integers(0, 20) | uint32,
    length=st.integers(0, 20) | uint32,
    factor=grpc_factor,
    token_overlap=st.integers(0, 3),
)
grpc_token_control = st.builds(pb.TokenControl, index=st.integers(0, 8) | uint32, factor=grpc_factor)


@st.composite
def prompts(draw) -> pb.Prompt:
    items = []
    for _ in range(draw(st.sampled_from([1, 1, 2, 3, 0]))):
        kind = draw(st.sampled_from(["text"] * 4 + ["token_ids"] * 2 + ["none"]))
        if kind == "text":
            items.append(pb.PromptItem(text=draw(proto_text)))
        elif kind == "token_ids":
            items.append(pb.PromptItem(token_ids=pb.TokenIds(ids=draw(st.lists(uint32 | st.integers(0, VOCAB - 1), max_size=6)))))
        else:
            items.append(pb.PromptItem())  # neither text nor token_ids
        # Controls of either kind on any item: the wrong kind for the item is refused too.
        items[-1].text_controls.extend(draw(st.lists(grpc_text_control, max_size=2)))
        items[-1].token_controls.extend(draw(st.lists(grpc_token_control, max_size=2)))
    return pb.Prompt(items=items)


def with_optionals(message, **optionals):
    for name, value in optionals.items():
        if value is not None:
            setattr(message, name, value)
    return message


@st.composite
def embed_requests(draw, model_name: str) -> pb.EmbedRequest:
    """OpenAI-style options, Aleph Alpha-style options, or any mix of both (which the server refuses)."""
    style = draw(st.sampled_from(["openai", "openai", "semantic", "mixed"]))
    message = pb.EmbedRequest(
        model=draw(grpc_models(model_name)), inputs=draw(st.lists(proto_text, max_size=4)), encoding=draw(enum(3))
    )
    if style in ("openai", "mixed"):
        with_optionals(message, dimensions=draw(maybe(dims)), truncate=draw(maybe(st.booleans())))
    if style in ("semantic", "mixed"):
        message.representation = draw(enum(4))
        message.normalize = draw(st.booleans())
        with_optionals(message, compress_to_size=draw(st.none() | st.just(128) | uint32))
    return message


def grpc_requests(model_name: str) -> dict:
    model = grpc_models(model_name)
    control_options = st.builds(
        lambda log_additive, threshold: with_optionals(
            pb.ControlOptions(), log_additive=log_additive, contextual_threshold=threshold
        ),
        maybe(st.booleans()),
        maybe(st.floats(allow_nan=True, allow_infinity=True)),
    )
    semantic_common = dict(representation=enum(4), normalize=st.booleans(), encoding=enum(3), controls=control_options)
    return {
        "Embed": embed_requests(model_name),
        "SemanticEmbed": st.builds(
            lambda message, compress: with_optionals(message, compress_to_size=compress),
            st.builds(pb.SemanticEmbedRequest, model=model, prompt=prompts(), **semantic_common),
            st.none() | st.just(128) | uint32,
        ),
        "BatchSemanticEmbed": st.builds(
            lambda message, compress: with_optionals(message, compress_to_size=compress),
            st.builds(pb.BatchSemanticEmbedRequest, model=model, prompts=st.lists(prompts(), max_size=4), **semantic_common),
            st.none() | st.just(128) | uint32,
        ),
        "EmbedLayers": st.builds(
            pb.EmbedLayersRequest,
            model=model,
            prompt=prompts(),
            layers=st.lists(st.integers(min_value=-6, max_value=6), min_size=1, max_size=3)
            | st.lists(st.integers(min_value=-9, max_value=9) | st.integers(min_value=-(2**31), max_value=2**31 - 1), max_size=4),
            poolings=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=3, unique=True)
            | st.lists(open_enum, max_size=4),
            tokens=st.booleans(),
            normalize=st.booleans(),
            encoding=enum(3),
            controls=control_options,
        ),
        "Tokenize": st.builds(pb.TokenizeRequest, model=model, prompt=proto_text),
        "Detokenize": st.builds(
            pb.DetokenizeRequest, model=model, token_ids=st.lists(uint32 | st.integers(0, VOCAB - 1), max_size=8)
        ),
        "ListModels": st.just(pb.ListModelsRequest()),
    }


@pytest.fixture(scope="module")
def grpc_channel(service):
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        yield channel


def check_grpc_error(method: str, message, error: grpc.RpcError) -> None:
    where = f"{method}({message!r}) -> {error.code()} {error.details()!r}"
    assert error.code() in GRPC_CODES, where
    assert error.details() and "Unexpected <class" not in error.details() and "Traceback" not in error.details(), where


@pytest.mark.parametrize("method", UNARY_METHODS)
@FUZZ
@given(data=st.data())
def test_grpc_methods_answer_with_actionable_codes(grpc_channel, model_name, method, data):
    message = data.draw(grpc_requests(model_name)[method], label="request")
    call = getattr(pb_grpc.EmbeddingServiceStub(grpc_channel), method)
    try:
        call(message, timeout=120)
    except grpc.RpcError as error:
        check_grpc_error(method, message, error)


@settings(FUZZ, max_examples=600)
@given(method=st.sampled_from(UNARY_METHODS), raw=st.binary(max_size=64))
def test_grpc_raw_bytes_answer_with_actionable_codes(grpc_channel, method, raw):
    call = grpc_channel.unary_unary(f"{SERVICE}/{method}", request_serializer=None, response_deserializer=None)
    try:
        call(raw, timeout=120)
    except grpc.RpcError as error:
        check_grpc_error(method, raw, error)


@st.composite
def stream_items(draw, model_name: str) -> list[pb.EmbedStreamRequest]:
    items = []
    for index in range(draw(st.integers(min_value=1, max_value=6))):
        item = pb.EmbedStreamRequest(
            id=draw(st.sampled_from([str(index), "", "dup", "é"])),
            text=draw(proto_text),
            model=draw(grpc_models(model_name)),
            encoding=draw(enum(3)),
        )
        items.append(with_optionals(item, dimensions=draw(maybe(dims)), truncate=draw(maybe(st.booleans()))))
    return items


@FEW
@given(data=st.data())
def test_grpc_stream_answers_every_id(grpc_channel, model_name, data):
    """Every item gets one reply, a vector or an error of an actionable kind; raw garbage ends the call INVALID_ARGUMENT."""
    items = data.draw(stream_items(model_name), label="items")
    garbage = data.draw(st.none() | st.binary(min_size=1, max_size=32), label="garbage")
    if garbage is None:
        call = pb_grpc.EmbeddingServiceStub(grpc_channel).EmbedStream(iter(items), timeout=120)
        replies = list(call)
        assert call.code() == grpc.StatusCode.OK
        assert sorted(r.id for r in replies) == sorted(i.id for i in items)
        for reply in replies:
            assert reply.HasField("embedding") != reply.HasField("error"), reply
            if reply.HasField("error"):
                assert reply.error.code in STREAM_ERROR_CODES and reply.error.message, reply.error
        return
    stream = grpc_channel.stream_stream(f"{SERVICE}/EmbedStream", request_serializer=None, response_deserializer=None)
    call = stream(iter([i.SerializeToString() for i in items] + [garbage]), timeout=120)
    try:
        for _ in call:
            pass
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (items, garbage, error)
        return
    assert call.code() == grpc.StatusCode.OK  # the garbage happened to decode as an EmbedStreamRequest


# --- afterwards ---------------------------------------------------------------------------------------------------


def test_service_still_answers_the_known_text(service, grpc_channel, model_name, reference):
    after = embed_http(service, model_name, KNOWN_TEXT)
    assert float(after @ reference) / float(np.linalg.norm(after) * np.linalg.norm(reference)) > 0.9999
    reply = pb_grpc.EmbeddingServiceStub(grpc_channel).Embed(pb.EmbedRequest(model=model_name, inputs=[KNOWN_TEXT]), timeout=60)
    vector = np.array(reply.embeddings[0].values, dtype=np.float64)
    assert float(vector @ reference) / float(np.linalg.norm(vector) * np.linalg.norm(reference)) > 0.9999
    status, _, body = request(service, "GET", "/health")
    assert status == 200, body

"""Validation that is the same everywhere, in the fast tier (the real app in-process, tests/http_harness.py):
JSON with a repeated key, `truncate` that is not a boolean, texts with nothing visible in them (HTTP and, through
the same core, gRPC), and /embed's layers and poolings bounded and named once. What the real clients send still
passes: their own request classes build the bodies here. Over the real processes: tests/test_refusal_floods_e2e.py.
"""

from __future__ import annotations

import json

import pytest
from aleph_alpha_client import EmbeddingRequest, Prompt, SemanticEmbeddingRequest, SemanticRepresentation, Text
from aleph_alpha_client.embedding import BatchSemanticEmbeddingRequest

from gateway.core.errors import ErrorKind, ServiceError
from gateway.core.prompts import PromptItem
from gateway.core.service import EmbedCall, SemanticEmbedCall, has_visible_text
from tests.http_harness import Gateway


async def post(gateway: Gateway, path: str, body: bytes | dict):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection = gateway.connect()
    connection.send(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    response = await connection.response()
    connection.close()
    return response


def refusal(response) -> tuple[str, str | None]:
    """(message, field) of a 400 in either contract's shape."""
    assert response.status == 400, (response.status, response.body)
    body = response.json()
    if isinstance(body["error"], dict):
        return body["error"]["message"], body["error"]["param"]
    return body["error"], body["field"]


# --- JSON with a repeated key ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "key"),
    [
        ("/v1/embeddings", b'{"model": "M", "input": "first", "input": "second"}', "input"),
        ("/v1/embeddings", b'{"model": "M", "model": "M", "input": "x"}', "model"),
        (
            "/semantic_embed",
            b'{"model": "M", "representation": "query", "prompt": [{"type": "text", "data": "a", "data": "b"}]}',
            "data",
        ),
        (
            "/embed",
            b'{"model": "M", "prompt": "x", "layers": [0], "pooling": ["mean"], "normalize": true, "normalize": false}',
            "normalize",
        ),
    ],
)
async def test_a_repeated_key_is_refused_naming_it(gateway, path, body, key):
    message, field = refusal(await post(gateway, path, body.replace(b'"M"', json.dumps(gateway.model.name).encode())))
    assert field == key and f"'{key}' appears more than once" in message
    assert gateway.triton.calls == []


@pytest.mark.parametrize(
    "body", [b'{"model": "M", "input": NaN}', b'{"model": "M", "input": "\\ud800"}', b"[" * 1000 + b"]" * 1000]
)
async def test_what_is_not_strict_json_is_refused_as_such(gateway, body):
    message, _ = refusal(await post(gateway, "/v1/embeddings", body))
    assert "JSON" in message or "nested too deeply" in message


# --- truncate is a JSON boolean -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", 1, "true", 0, "false", [], {}])
async def test_truncate_that_is_not_a_boolean_is_refused(gateway, value):
    message, field = refusal(
        await post(gateway, "/v1/embeddings", {"model": gateway.model.name, "input": "x", "truncate": value})
    )
    assert field == "truncate" and "boolean" in message


@pytest.mark.parametrize("value", [True, False, None])
async def test_truncate_true_false_or_null_is_taken(gateway, value):
    response = await post(gateway, "/v1/embeddings", {"model": gateway.model.name, "input": "x", "truncate": value})
    assert response.status == 200, response.body


# --- nothing visible to embed ---------------------------------------------------------------------------------------

INVISIBLE = [" ", "   \t\n\r ", "\x00", "\x01\x02\x7f", "\u200b\u200d\ufeff", "\u3000\xa0", " \u202e\n"]


@pytest.mark.parametrize("text", INVISIBLE)
async def test_a_text_with_nothing_visible_is_refused_naming_the_field_in_every_route(gateway, text):
    name = gateway.model.name
    cases = [
        ("/v1/embeddings", {"model": name, "input": text}, "input", "'input[0]'"),
        ("/v1/embeddings", {"model": name, "input": ["fine", text]}, "input", "'input[1]'"),
        ("/semantic_embed", {"model": name, "prompt": text, "representation": "query"}, "prompt", "'prompt'"),
        (
            "/semantic_embed",
            {
                "model": name,
                "prompt": [{"type": "text", "data": text}, {"type": "text", "data": text}],
                "representation": "query",
            },
            "prompt",
            "'prompt'",
        ),
        (
            "/batch_semantic_embed",
            {"model": name, "prompts": ["fine", text], "representation": "document"},
            "prompts",
            "'prompts[1]'",
        ),
        ("/embed", {"model": name, "prompt": text, "layers": [-1], "pooling": ["mean"]}, "prompt", "'prompt'"),
    ]
    for path, body, field, where in cases:
        message, named = refusal(await post(gateway, path, body))
        assert named == field and message.startswith(where) and "whitespace or control characters" in message, (path, message)
    assert gateway.triton.calls == []


@pytest.mark.parametrize("text", INVISIBLE)
async def test_the_core_refuses_them_for_grpc_too(gateway, text):
    """grpc_api hands texts to the same core calls, with its own field names."""
    with pytest.raises(ServiceError) as raised:
        await gateway.service.embed(EmbedCall(model=gateway.model.name, texts=["ok", text], input_field="inputs"))
    assert (raised.value.kind, raised.value.param) == (ErrorKind.VALIDATION, "inputs")
    assert raised.value.message.startswith("'inputs[1]'")
    with pytest.raises(ServiceError) as raised:
        call = SemanticEmbedCall(model=gateway.model.name, prompts=[[PromptItem("text", text)]], prompt_field="prompt")
        await gateway.service.semantic_embed(call)
    assert (raised.value.kind, raised.value.param) == (ErrorKind.VALIDATION, "prompt")


@pytest.mark.parametrize("text", ["a", " a ", "\n\nA title\n", "é", "🙂", "x\x00y", "\u200bword"])
def test_a_text_with_something_visible_is_taken(text):
    assert has_visible_text(text)


async def test_whitespace_next_to_token_ids_or_visible_text_is_taken(gateway):
    name = gateway.model.name
    prompt = [{"type": "text", "data": "  "}, {"type": "token_ids", "data": [7592]}]
    assert (await post(gateway, "/semantic_embed", {"model": name, "prompt": prompt, "representation": "query"})).status == 200
    prompt = [{"type": "text", "data": "  "}, {"type": "text", "data": "hello"}]
    assert (await post(gateway, "/semantic_embed", {"model": name, "prompt": prompt, "representation": "query"})).status == 200


# --- /embed: layers and poolings bounded, each named once ------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "pooling", "field", "says"),
    [
        (list(range(7)) * 1500, ["mean"], "layers", "must name 1 to 7 layers"),
        ([0, 1, 0], ["mean"], "layers", "layer 0 is named twice"),
        ([-1, 6], ["mean"], "layers", "-1 and 6 name the same layer"),
        ([7], ["mean"], "layers", "out of range"),
        ([], ["mean"], "layers", "must name 1 to 7 layers"),
        ([0], ["mean"] * 10_000, "pooling", "each once; got 10000 poolings"),
        ([0], ["mean", "max", "mean"], "pooling", "names 'mean' twice"),
        ([0], ["median"], "pooling", "must hold one or more of"),
        ([0], [], "pooling", "must hold one or more of"),
    ],
)
async def test_layers_and_poolings_are_bounded_and_named_once(gateway, layers, pooling, field, says):
    body = {"model": gateway.model.name, "prompt": "hello", "layers": layers, "pooling": pooling}
    message, named = refusal(await post(gateway, "/embed", body))
    assert named == field and says in message, message
    assert gateway.triton.calls == []


async def test_every_layer_and_every_pooling_once_is_taken(gateway):
    depth = gateway.model.num_layers + 1
    poolings = list(gateway.model.layer_poolings)
    body = {"model": gateway.model.name, "prompt": "hello", "layers": [*range(depth - 1), -1], "pooling": poolings}
    response = await post(gateway, "/embed", body)
    assert response.status == 200, response.body
    assert sorted(response.json()["embeddings"]) == sorted(f"layer_{i}" for i in [*range(depth - 1), -1])


# --- what the real clients send --------------------------------------------------------------------------------------


async def test_the_real_clients_bodies_pass(gateway):
    name = gateway.model.name
    prompt = Prompt([Text.from_text("The cat sits outside.")])
    query, document = SemanticRepresentation.Query, SemanticRepresentation.Document
    bodies = [
        ("/semantic_embed", SemanticEmbeddingRequest(prompt=prompt, representation=query, compress_to_size=128).to_json()),
        (
            "/batch_semantic_embed",
            BatchSemanticEmbeddingRequest(prompts=[prompt, Prompt.from_text("hi")], representation=document).to_json(),
        ),
        (
            "/embed",
            EmbeddingRequest(prompt=prompt, layers=[-1, 0], pooling=["mean", "max"], tokens=True, normalize=True).to_json(),
        ),
        # The openai client: encoding_format base64 unless told otherwise, and its optional fields.
        ("/v1/embeddings", {"input": ["first", "second"], "encoding_format": "base64", "user": "u", "dimensions": 64}),
    ]
    for path, body in bodies:
        response = await post(gateway, path, {**body, "model": name})
        assert response.status == 200, (path, response.body)

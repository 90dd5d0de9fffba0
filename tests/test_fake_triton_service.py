"""The service, the gRPC stream batcher and every HTTP route over a fake Triton whose answers can be checked (fast tier).

tests.fake_triton.FakeTriton answers each row with a vector computed from that row's token ids alone, so each test
can say exactly which vector each answer row must hold: a row given to the wrong input, or put back in the wrong
place after the gateway sorted, chunked, coalesced and reassembled the rows, fails. The faults are the fake's too:
UNAVAILABLE (a restart), a stall, an error for the calls that carry one request's text, Triton down for good. All in
process: no socket, no Triton. The real processes: the *_e2e.py tests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from gateway.core.chunking import STRICT
from gateway.core.controls import TokenControl
from gateway.core.deadline import Deadline
from gateway.core.errors import ErrorKind, ServiceError
from gateway.core.prompts import PromptItem
from gateway.core.service import EmbedCall, EmbedLayersCall, SemanticEmbedCall
from gateway.transports.grpc.servicer import EmbeddingServicer, encoding_error
from gateway.transports.grpc.stream import StreamBatcher, StreamReply
from proto.embedding.v1 import embedding_pb2 as pb
from tests.fake_triton import FakeTriton, triton_error
from tests.http_harness import Gateway

WORDS = (
    "the quick brown fox jumps over a lazy dog while triton batches ragged requests of text into calls "
    "sorted by length and every answer must find its way back to the question that asked it"
).split()


def mixed_texts(count: int, seed: int = 0, prefix: str = "") -> list[str]:
    """Distinct texts from one word to a few hundred characters, in no order of length."""
    rng = random.Random(seed)
    return [
        f"{prefix}{index}: " + " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 3, 5, 8, 13, 21, 40, 90])))
        for index in range(count)
    ]


def normalized(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector, axis=-1, keepdims=True)


def assert_rows(triton: FakeTriton, inputs: list, values, counts=None, **kind) -> None:
    """Row i of `values` (and `counts`) is what the fake answers for inputs[i] on its own."""
    assert len(values) == len(inputs)
    for index, row in enumerate(inputs):
        vector, count = triton.expected(row, **kind)
        np.testing.assert_allclose(np.asarray(values[index], dtype=np.float32), vector, rtol=1e-5, err_msg=f"row {index}")
        if counts is not None:
            assert int(counts[index]) == count, f"row {index}"


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
async def gw(models):
    """The in-process gateway over a fake Triton; afterwards nothing is left queued or in flight, and the gateway sent
    Triton nothing its ensembles would refuse."""
    gateway = Gateway(models)
    yield gateway
    await settle()
    assert gateway.triton.refused == []
    assert gateway.scheduler.pending_texts == 0 and gateway.scheduler.rows_in_flight == 0


@pytest.fixture
async def gw_one_call_per_lane(models):
    gateway = Gateway(models, max_calls_per_lane=1)
    yield gateway
    await settle()
    assert gateway.triton.refused == []
    assert gateway.scheduler.pending_texts == 0 and gateway.scheduler.rows_in_flight == 0


# -- EmbeddingService: order, chunking, coalescing, every kind of input ---------------------------------------------


async def test_a_hundred_texts_of_mixed_lengths_come_back_in_order_across_chunks(gw):
    texts = mixed_texts(100)
    result = await gw.service.embed(EmbedCall(model=gw.model.name, texts=texts))
    assert_rows(gw.triton, texts, result.embeddings, result.token_counts)
    calls = gw.triton.calls
    # Chunked by length in 32s (the lane's limit, under the model's 64), each chunk its own call.
    assert [len(call.rows) for call in calls] == [32, 32, 32, 4]
    assert all(call.lane.max_rows == 32 for call in calls)
    sent = [text for call in calls for text in call.rows]
    assert sorted(sent) == sorted(texts)
    assert [len(text) for text in sent] == sorted(len(text) for text in texts)
    assert result.total_tokens == sum(gw.triton.expected(text)[1] for text in texts)


async def test_requests_queued_behind_a_call_share_the_next_calls_and_each_gets_its_own_rows(gw_one_call_per_lane):
    gw = gw_one_call_per_lane
    gw.triton.stall()
    requests = [mixed_texts(1 + index % 5, seed=index, prefix=f"request {index} ") for index in range(12)]
    tasks = [asyncio.create_task(gw.service.embed(EmbedCall(model=gw.model.name, texts=texts))) for texts in requests]
    await settle()
    assert len(gw.triton.calls) == 1  # the first request's call holds the lane; the others queue
    gw.triton.release()
    results = await asyncio.gather(*tasks)
    for texts, result in zip(requests, results):
        assert_rows(gw.triton, texts, result.embeddings, result.token_counts)
    owner = {text: index for index, texts in enumerate(requests) for text in texts}
    requests_per_call = [len({owner[text] for text in call.rows}) for call in gw.triton.calls]
    assert max(requests_per_call) >= 5  # the queued requests left together
    assert len(gw.triton.calls) < len(requests)
    assert all(len(call.rows) <= 32 for call in gw.triton.calls)


async def test_order_holds_when_a_hundred_texts_go_one_call_at_a_time(gw_one_call_per_lane):
    gw = gw_one_call_per_lane
    texts = mixed_texts(100, seed=3)
    other = mixed_texts(7, seed=4, prefix="other ")
    results = await asyncio.gather(
        gw.service.embed(EmbedCall(model=gw.model.name, texts=texts)),
        gw.service.embed(EmbedCall(model=gw.model.name, texts=other)),
    )
    assert_rows(gw.triton, texts, results[0].embeddings, results[0].token_counts)
    assert_rows(gw.triton, other, results[1].embeddings, results[1].token_counts)
    assert len(gw.triton.calls) >= 4


async def test_token_id_sequences_of_several_widths_are_reassembled_in_input_order(gw):
    rng = random.Random(5)
    sequences = [[rng.randrange(1000, 29000) for _ in range(rng.randrange(1, 60))] for _ in range(70)]
    result = await gw.service.embed(EmbedCall(model=gw.model.name, token_ids=sequences))
    assert_rows(gw.triton, sequences, result.embeddings, result.token_counts)
    widths = {call.lane.row_shape[0] for call in gw.triton.calls}
    assert len(widths) >= 3 and all(width % 16 == 0 for width in widths)  # one lane per padded width
    assert all(call.lane.model == gw.model.embedding.token_ids for call in gw.triton.calls)


async def test_a_text_and_its_token_ids_embed_alike(gw):
    texts = mixed_texts(10, seed=6)
    by_text = await gw.service.embed(EmbedCall(model=gw.model.name, texts=texts))
    by_ids = await gw.service.embed(EmbedCall(model=gw.model.name, token_ids=[gw.triton.tokens(text) for text in texts]))
    np.testing.assert_array_equal(by_text.embeddings, by_ids.embeddings)
    np.testing.assert_array_equal(by_text.token_counts, by_ids.token_counts)


async def test_semantic_embed_puts_texts_token_ids_and_controlled_prompts_back_in_prompt_order(gw):
    ids = gw.triton.tokens("attention goes where it is told")
    prompts = [
        [PromptItem("text", "a plain text prompt")],
        [PromptItem("token_ids", ids)],
        [PromptItem("text", "a text and then"), PromptItem("token_ids", ids[:3])],
        [PromptItem("token_ids", ids, (TokenControl(2, 0.25),))],
        [PromptItem("text", "another plain one, longer than the first of them")],
        [PromptItem("token_ids", ids, (TokenControl(0, 3.0),))],
    ]
    call = SemanticEmbedCall(model=gw.model.name, prompts=prompts, representation="document")
    result = await gw.service.semantic_embed(call)
    factors = lambda at, factor: [factor if i == at else 1.0 for i in range(len(ids))]  # noqa: E731
    expected_inputs = [
        "a plain text prompt",
        ids,
        gw.triton.tokens("a text and then") + ids[:3],
        (ids, factors(2, 0.25), True),
        "another plain one, longer than the first of them",
        (ids, factors(0, 3.0), True),
    ]
    assert_rows(gw.triton, expected_inputs, result.embeddings, result.token_counts)
    model = gw.model
    assert {call.lane.model for call in gw.triton.calls} == {
        model.embedding.text,
        model.embedding.token_ids,
        model.embedding.controlled,
    }
    # The controls reached the encoder: the controlled prompts differ from the same ids without them.
    assert not np.allclose(result.embeddings[3], result.embeddings[1])


async def test_compressed_and_normalized_semantic_embeddings_of_many_prompts(gw):
    texts = mixed_texts(45, seed=7)
    compression = gw.model.compression
    call = SemanticEmbedCall(
        model=gw.model.name,
        prompts=[[PromptItem("text", text)] for text in texts],
        representation="query",
        compress_to_size=compression.size,
        normalize=True,
    )
    result = await gw.service.semantic_embed(call)
    assert result.embeddings.shape == (45, compression.size)
    expected = [normalized(gw.triton.expected(text, compressed=True)[0]) for text in texts]
    np.testing.assert_allclose(result.embeddings, np.stack(expected), rtol=1e-5, atol=1e-7)
    assert result.model_version == compression.model_version(gw.model.model_version)
    assert {call.lane.model for call in gw.triton.calls} == {compression.ensembles.text}


async def test_dimensions_keep_the_first_values_renormalized(gw):
    texts = mixed_texts(5, seed=8)
    result = await gw.service.embed(EmbedCall(model=gw.model.name, texts=texts, dimensions=64))
    expected = np.stack([normalized(gw.triton.expected(text)[0][:64]) for text in texts])
    np.testing.assert_allclose(result.embeddings, expected, rtol=1e-5, atol=1e-7)


async def test_embed_layers_picks_the_asked_layers_and_poolings_of_its_prompt(gw):
    text = "which layer is which, and which pooling"
    call = EmbedLayersCall(
        model=gw.model.name, prompt=[PromptItem("text", text)], layers=[0, -1, 3], poolings=["max", "mean"], tokens=True
    )
    result = await gw.service.embed_layers(call)
    pooled, count = gw.triton.expected(text, layers=True)
    column = {name: index for index, name in enumerate(gw.model.layer_poolings)}
    depth = gw.model.num_layers + 1
    assert [layer for layer, _ in result.layers] == [0, -1, 3]
    for layer, by_pooling in result.layers:
        assert list(by_pooling) == ["max", "mean"]
        for name, vector in by_pooling.items():
            np.testing.assert_allclose(vector, pooled[layer % depth, column[name]], rtol=1e-6)
    assert result.tokens == gw.model.tokenizer.encode(text, add_special_tokens=False).tokens
    assert result.num_tokens == count
    assert [call.lane.output for call in gw.triton.calls] == ["POOLED"]


async def test_an_overlong_text_is_refused_by_its_index_or_cut_when_truncating(gw):
    long_text = " ".join(WORDS * 10)
    texts = ["short", long_text, "short too"]
    full_count = gw.triton.expected(long_text)[1]
    assert full_count > gw.model.max_sequence_length
    with pytest.raises(ServiceError) as refused:
        await gw.service.embed(EmbedCall(model=gw.model.name, texts=texts))
    assert refused.value.kind is ErrorKind.VALIDATION and refused.value.param == "input"
    assert f"'input[1]' has {full_count} tokens" in refused.value.message
    # Refused by the tokenizer step, in the one call that asked not to truncate: nothing of it was encoded.
    assert [(call.lane.parameters, call.answered) for call in gw.triton.calls] == [(STRICT, False)]
    gw.triton.calls.clear()

    result = await gw.service.embed(EmbedCall(model=gw.model.name, texts=texts, truncate=True))
    assert_rows(gw.triton, texts, result.embeddings)
    assert result.token_counts.tolist() == [3, gw.model.max_sequence_length, 4]
    assert [call.lane.parameters for call in gw.triton.calls] == [()]  # truncating: the step cuts, as it always did


async def test_an_overlong_text_fails_its_own_request_alone_before_the_encoder(gw_one_call_per_lane):
    """The tokenizer step refuses it in a call that does not truncate; the requests that shared that call are sent
    again on their own and answered, and the gateway names the text by its index and count."""
    gw = gw_one_call_per_lane
    long_text = " ".join(WORDS * 10)
    gw.triton.stall()
    first = asyncio.create_task(gw.service.embed(EmbedCall(model=gw.model.name, texts=["first"])))
    await settle()
    calls = [["one", "two"], ["fine", long_text], ["three"]]
    shared = [asyncio.create_task(gw.service.embed(EmbedCall(model=gw.model.name, texts=texts))) for texts in calls]
    await settle()
    gw.triton.release()
    await first
    done = await asyncio.gather(*shared, return_exceptions=True)
    refused = done[1]
    assert isinstance(refused, ServiceError) and refused.kind is ErrorKind.VALIDATION and refused.param == "input"
    assert f"'input[1]' has {gw.triton.expected(long_text)[1]} tokens" in refused.message
    for texts, result in ((calls[0], done[0]), (calls[2], done[2])):
        assert not isinstance(result, BaseException)
        assert_rows(gw.triton, texts, result.embeddings, result.token_counts)
    shared_call = gw.triton.calls[1]
    assert long_text in shared_call.rows and not shared_call.answered
    assert not any(call.answered and long_text in call.rows for call in gw.triton.calls)  # never encoded


# -- EmbeddingService: faults ----------------------------------------------------------------------------------------


async def test_a_call_that_meets_an_unavailable_triton_is_retried_until_it_is_served(gw):
    gw.triton.fail(triton_error("UNAVAILABLE"), times=2)
    texts = mixed_texts(3, seed=9)
    result = await gw.service.embed(EmbedCall(model=gw.model.name, texts=texts))
    assert_rows(gw.triton, texts, result.embeddings, result.token_counts)
    assert len(gw.triton.calls) == 3
    assert all(call.rows == gw.triton.calls[0].rows for call in gw.triton.calls)


async def test_a_triton_unavailable_until_the_deadline_answers_unavailable(gw):
    gw.triton.fail(triton_error("UNAVAILABLE"))
    started = time.monotonic()
    with pytest.raises(ServiceError) as failed:
        await gw.service.embed(EmbedCall(model=gw.model.name, texts=["a"], deadline=Deadline.within(0.3)))
    assert failed.value.kind is ErrorKind.UNAVAILABLE
    assert "stayed unavailable until the deadline" in failed.value.message
    assert time.monotonic() - started < 0.3 + 0.5  # at the deadline (and a loaded machine's slack), not later
    assert len(gw.triton.calls) >= 2


async def test_a_stalled_triton_answers_deadline_exceeded_at_the_deadline_and_drops_the_call(gw):
    gw.triton.stall()
    started = time.monotonic()
    with pytest.raises(ServiceError) as failed:
        await gw.service.embed(EmbedCall(model=gw.model.name, texts=["a", "b"], deadline=Deadline.within(0.15)))
    assert failed.value.kind is ErrorKind.DEADLINE_EXCEEDED
    assert 0.14 <= time.monotonic() - started < 0.15 + 0.5
    (call,) = gw.triton.calls
    assert call.timeout_s <= 0.15
    await settle()
    assert gw.scheduler.rows_in_flight == 0 and gw.scheduler.pending_texts == 0


async def test_an_error_for_one_request_fails_it_alone(gw):
    gw.triton.fail(triton_error("INTERNAL", "the tokenizer step failed"), when_text_contains="poison")
    bad = asyncio.create_task(gw.service.embed(EmbedCall(model=gw.model.name, texts=["fine", "poison pill"])))
    good_texts = mixed_texts(4, seed=10)
    good = asyncio.create_task(gw.service.embed(EmbedCall(model=gw.model.name, texts=good_texts)))
    with pytest.raises(ServiceError) as failed:
        await bad
    assert failed.value.kind is ErrorKind.BACKEND
    assert failed.value.message == "internal error; it has been logged"  # Triton's words stay in the log
    assert_rows(gw.triton, good_texts, (await good).embeddings)


async def test_a_triton_down_for_good_is_refused_at_once_without_a_call(gw):
    gw.triton.go_down("tritonserver exited with status 1")
    with pytest.raises(ServiceError) as failed:
        await gw.service.embed(EmbedCall(model=gw.model.name, texts=["a"]))
    assert failed.value.kind is ErrorKind.UNAVAILABLE
    assert "tritonserver exited with status 1" in failed.value.message
    assert gw.triton.calls == []


# -- HTTP: every route --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "encoding_format"), [("/v1/embeddings", None), ("/embeddings", "base64")])
async def test_openai_embeddings_of_a_hundred_texts_in_order(gw, path, encoding_format):
    texts = mixed_texts(100, seed=11)
    body = {"input": texts} | ({"encoding_format": encoding_format} if encoding_format else {})
    response = await gw.post(path, body)
    assert response.status == 200, response.body
    answer = response.json()
    assert [item["index"] for item in answer["data"]] == list(range(100))
    vectors = [item["embedding"] for item in answer["data"]]
    if encoding_format == "base64":
        vectors = [np.frombuffer(base64.b64decode(vector), dtype="<f4") for vector in vectors]
    assert_rows(gw.triton, texts, vectors)
    tokens = sum(gw.triton.expected(text)[1] for text in texts)
    assert answer["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert answer["model"] == gw.model.name


@pytest.mark.parametrize("shape", ["one list of ids", "lists of ids"])
async def test_openai_embeddings_of_token_ids(gw, shape):
    sequences = [gw.triton.tokens(text) for text in mixed_texts(20, seed=12)]
    response = await gw.post("/v1/embeddings", {"input": sequences[0] if shape == "one list of ids" else sequences})
    assert response.status == 200, response.body
    inputs = sequences[:1] if shape == "one list of ids" else sequences
    assert_rows(gw.triton, inputs, [item["embedding"] for item in response.json()["data"]])


@pytest.mark.parametrize(("compress", "normalize"), [(False, False), (True, True)])
async def test_semantic_embed(gw, compress, normalize):
    text = "one prompt, as Aleph Alpha's client sends it"
    body = {"prompt": text, "representation": "symmetric", "normalize": normalize}
    compression = gw.model.compression
    if compress:
        body["compress_to_size"] = compression.size
    response = await gw.post("/semantic_embed", body)
    assert response.status == 200, response.body
    answer = response.json()
    vector, count = gw.triton.expected(text, compressed=compress)
    np.testing.assert_allclose(answer["embedding"], normalized(vector) if normalize else vector, rtol=1e-5, atol=1e-7)
    assert answer["num_tokens_prompt_total"] == count
    assert answer["model_version"] == (compression.model_version(gw.model.model_version) if compress else gw.model.model_version)


async def test_batch_semantic_embed_of_a_hundred_prompts_in_order(gw):
    texts = mixed_texts(99, seed=13)
    ids = gw.triton.tokens("token ids among the texts")
    prompts = [*texts[:50], [{"type": "token_ids", "data": ids}], *texts[50:]]
    response = await gw.post("/batch_semantic_embed", {"prompts": prompts, "representation": "document"})
    assert response.status == 200, response.body
    answer = response.json()
    inputs = [*texts[:50], ids, *texts[50:]]
    assert_rows(gw.triton, inputs, answer["embeddings"])
    assert answer["num_tokens_prompt_total"] == sum(gw.triton.expected(row)[1] for row in inputs)


async def test_embed_answers_each_asked_layer_and_pooling(gw):
    text = "layers of a prompt"
    body = {"prompt": text, "layers": [-1, 0], "pooling": ["abs_max", "mean"], "tokens": True}
    response = await gw.post("/embed", body)
    assert response.status == 200, response.body
    answer = response.json()
    pooled, count = gw.triton.expected(text, layers=True)
    column = {name: index for index, name in enumerate(gw.model.layer_poolings)}
    assert list(answer["embeddings"]) == ["layer_-1", "layer_0"]
    for key, layer in (("layer_-1", gw.model.num_layers), ("layer_0", 0)):
        assert list(answer["embeddings"][key]) == ["abs_max", "mean"]
        for name, vector in answer["embeddings"][key].items():
            np.testing.assert_allclose(vector, pooled[layer, column[name]], rtol=1e-6)
    assert answer["tokens"] == gw.model.tokenizer.encode(text, add_special_tokens=False).tokens
    assert answer["num_tokens_prompt_total"] == count


async def test_tokenize_and_detokenize_answer_from_the_tokenizer_without_triton(gw):
    text = "Tokenization happens in the gateway, here."
    encoding = gw.model.tokenizer.encode(text, add_special_tokens=False)
    response = await gw.post("/tokenize", {"prompt": text, "tokens": True, "token_ids": True})
    assert response.status == 200, response.body
    assert response.json() == {"tokens": encoding.tokens, "token_ids": encoding.ids}
    response = await gw.post("/detokenize", {"token_ids": encoding.ids})
    assert response.status == 200, response.body
    assert response.json() == {"result": gw.model.tokenizer.decode(encoding.ids)}
    assert gw.triton.calls == []


async def test_the_model_listings_describe_the_served_model(gw):
    model = gw.model
    response = await gw.request("GET", "/models_available")
    assert response.status == 200
    (listed,) = response.json()
    assert (listed["name"], listed["model_version"]) == (model.name, model.model_version)
    assert listed["embedding_dimensions"] == model.dimensions
    assert listed["compress_to_sizes"] == [model.compression.size] == [128]
    assert listed["max_context_size"] == model.max_sequence_length
    assert listed["poolings"] == list(model.layer_poolings)
    assert listed["semantic_embed_representations"] == ["document", "query", "symmetric"]
    # Where its encoder runs, as the export's manifest says.
    assert (listed["precision"], listed["target"]) == (model.precision, model.target)
    assert listed["execution_providers"] == list(model.execution_providers)

    response = await gw.request("GET", "/v1/models")
    assert [item["id"] for item in response.json()["data"]] == [model.name]
    response = await gw.request("GET", f"/models/{model.name}/tokenizer")
    assert json.loads(response.body) == json.loads(model.tokenizer.to_str())
    assert gw.triton.calls == []


ROUTES = [
    ("/v1/embeddings", {"input": ["fault", "finding"]}),
    ("/semantic_embed", {"prompt": "fault finding", "representation": "symmetric"}),
    ("/batch_semantic_embed", {"prompts": ["fault", "finding"], "representation": "query"}),
    ("/embed", {"prompt": "fault finding", "layers": [-1], "pooling": ["mean"]}),
]

# Per fault: how to cause it, the request's X-Request-Timeout, and the status, kind and Retry-After expected.
FAULTS = {
    "backend error": (lambda t: t.fail(triton_error("INTERNAL")), None, 500, "backend", None),
    "triton overloaded": (lambda t: t.fail(triton_error("RESOURCE_EXHAUSTED")), None, 429, "overloaded", "1"),
    "unavailable until the deadline": (lambda t: t.fail(triton_error("UNAVAILABLE")), "0.3", 503, "unavailable", "2"),
    "stalled past the deadline": (lambda t: t.stall(), "0.1", 503, "deadline_exceeded", "1"),
    "down for good": (lambda t: t.go_down(), None, 503, "unavailable", "2"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize(("path", "body"), ROUTES, ids=[path for path, _ in ROUTES])
async def test_a_failing_triton_is_answered_in_the_contracts_error_shape(gw, fault, path, body, caplog):
    caplog.set_level(logging.INFO, logger="gateway.access")
    cause, timeout, status, kind, retry_after = FAULTS[fault]
    cause(gw.triton)
    response = await gw.post(path, body, {"X-Request-Timeout": timeout} if timeout else None)
    assert response.status == status, response.body
    assert response.headers.get("retry-after") == retry_after
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    if path == "/v1/embeddings":
        error = answer["error"]
        expected_type = {500: "server_error", 429: "rate_limit_error", 503: "service_unavailable"}[status]
        assert (error["code"], error["type"]) == (kind, expected_type)
        assert {"message", "param", "request_id"} <= set(error)
        message = error["message"]
    else:
        assert answer["code"] == kind.upper()
        assert {"error", "field", "request_id"} <= set(answer)
        message = answer["error"]
    if kind == "backend":
        assert message == "internal error; it has been logged"
    assert bool(gw.triton.calls) == (fault != "down for good")  # down for good: refused before any call
    # The metrics count the error's kind, not a guess from its status (a missed deadline and a Triton down are both
    # 503); a failure of ours is no refusal of the caller's request.
    assert rejections(gw) == ({} if kind == "backend" else {kind: 1.0})
    # So does the request's access-log line, which a status alone would leave to guesswork.
    (line,) = [record for record in caplog.records if record.name == "gateway.access"]
    assert (line.fields["status"], line.fields["error"]) == (str(status), kind)


def rejections(gw) -> dict[str, float]:
    return {
        sample.labels["reason"]: sample.value
        for family in gw.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "embed_gateway_rejections_total" and sample.value
    }


async def test_http_requests_that_share_a_call_each_get_their_rows_and_triton_hears_each_request_id(gw_one_call_per_lane):
    gw = gw_one_call_per_lane
    gw.triton.stall()
    requests = {f"req-{index}": mixed_texts(1 + index, seed=20 + index, prefix=f"http {index} ") for index in range(5)}
    answers = {}
    for request_id, texts in requests.items():
        body = {"model": gw.model.name, "input": texts}
        answers[request_id] = asyncio.create_task(gw.request("POST", "/v1/embeddings", body, {"X-Request-Id": request_id}))
        await settle()
    gw.triton.release()
    for request_id, texts in requests.items():
        response = await answers[request_id]
        assert response.status == 200, response.body
        assert_rows(gw.triton, texts, [item["embedding"] for item in response.json()["data"]])
    first, shared = gw.triton.calls
    assert first.request_ids == ["req-0"]
    assert sorted(shared.request_ids) == ["req-1", "req-2", "req-3", "req-4"]  # one call, named after each of them


async def test_the_callers_deadline_travels_to_triton(gw):
    response = await gw.post("/v1/embeddings", {"input": "hurry"}, {"X-Request-Timeout": "2"})
    assert response.status == 200
    (call,) = gw.triton.calls
    assert 1.5 < call.timeout_s <= 2.0


async def test_a_client_that_leaves_has_its_call_cancelled(gw):
    gw.triton.stall()
    connection = gw.connect()
    connection.send(gw.message("POST", "/v1/embeddings", {"model": gw.model.name, "input": ["left", "behind"]}))
    async with asyncio.timeout(2):
        await gw.triton.called.wait()
    connection.close()
    await settle()
    (call,) = gw.triton.calls
    assert call.cancelled
    assert gw.scheduler.pending_texts == 0


# -- gRPC: the stream batcher and the servicer ------------------------------------------------------------------------


async def stream_of(messages: list) -> AsyncIterator:
    for message in messages:
        yield message


async def run_stream(batcher: StreamBatcher, messages: list) -> dict[str, StreamReply]:
    replies: dict[str, StreamReply] = {}
    async for reply in batcher.embed(stream_of(messages)):
        assert reply.item.id not in replies, f"{reply.item.id} answered twice"
        replies[reply.item.id] = reply
    assert set(replies) == {message.id for message in messages}
    return replies


def batcher_for(gw: Gateway, max_batch: int = 8) -> StreamBatcher:
    return StreamBatcher(gw.service, max_batch, check=lambda item: encoding_error(item.encoding), batches_in_flight=2)


async def test_the_stream_batcher_answers_each_of_a_hundred_items_with_its_own_vector(gw):
    texts = mixed_texts(100, seed=14)
    messages = [pb.EmbedStreamRequest(id=f"item-{i}", text=text, model=gw.model.name) for i, text in enumerate(texts)]
    replies = await run_stream(batcher_for(gw), messages)
    for message in messages:
        reply = replies[message.id]
        assert reply.error is None, reply.error
        vector, count = gw.triton.expected(message.text)
        np.testing.assert_allclose(reply.vector, vector, rtol=1e-6)
        assert reply.token_count == count
    assert len(gw.triton.calls) < 100 and max(len(call.rows) for call in gw.triton.calls) > 1  # batched


async def test_the_stream_batcher_keeps_items_with_different_options_apart(gw):
    texts = mixed_texts(12, seed=15)
    messages = []
    for i, text in enumerate(texts):
        message = pb.EmbedStreamRequest(id=str(i), text=text, model=gw.model.name)
        if i % 3 == 1:
            message.dimensions = 16
        elif i % 3 == 2:
            message.truncate = True
        messages.append(message)
    replies = await run_stream(batcher_for(gw, max_batch=12), messages)
    for i, text in enumerate(texts):
        vector = gw.triton.expected(text)[0]
        expected = normalized(vector[:16]) if i % 3 == 1 else vector
        np.testing.assert_allclose(replies[str(i)].vector, expected, rtol=1e-5, atol=1e-7)


async def test_one_invalid_stream_item_fails_alone_and_never_reaches_triton(gw):
    texts = mixed_texts(8, seed=16)
    texts[3] = " \t "
    messages = [pb.EmbedStreamRequest(id=str(i), text=text, model=gw.model.name) for i, text in enumerate(texts)]
    messages.append(pb.EmbedStreamRequest(id="bad-encoding", text="fine", model=gw.model.name, encoding=99))
    replies = await run_stream(batcher_for(gw), messages)
    failed = {key for key, reply in replies.items() if reply.error is not None}
    assert failed == {"3", "bad-encoding"}
    assert replies["3"].error.kind is ErrorKind.VALIDATION and replies["3"].error.param == "text"
    assert replies["bad-encoding"].error.param == "encoding"
    for i, text in enumerate(texts):
        if i != 3:
            np.testing.assert_allclose(replies[str(i)].vector, gw.triton.expected(text)[0], rtol=1e-6)
    assert all(texts[3] not in call.rows for call in gw.triton.calls)


async def test_a_triton_error_fails_the_items_of_its_call_and_the_stream_goes_on(gw):
    gw.triton.fail(triton_error("INTERNAL"), when_text_contains="poison")
    texts = mixed_texts(20, seed=17)
    texts[6] = "poison " + texts[6]
    messages = [pb.EmbedStreamRequest(id=str(i), text=text, model=gw.model.name) for i, text in enumerate(texts)]
    replies = await run_stream(batcher_for(gw, max_batch=4), messages)
    in_failed_calls = {text for call in gw.triton.calls if any("poison" in row for row in call.rows) for text in call.rows}
    for i, text in enumerate(texts):
        reply = replies[str(i)]
        if text in in_failed_calls:
            assert reply.error is not None and reply.error.kind is ErrorKind.BACKEND
        else:
            assert reply.error is None
            np.testing.assert_allclose(reply.vector, gw.triton.expected(text)[0], rtol=1e-6)
    assert texts[6] in in_failed_calls and len(in_failed_calls) < len(texts)


class Context:
    """What the servicer asks of a gRPC call's context: its time remaining, and abort."""

    def __init__(self, time_remaining: float | None = None):
        self._time_remaining = time_remaining
        self.aborted: tuple[grpc.StatusCode, str, dict[str, str]] | None = None

    def time_remaining(self) -> float | None:
        return self._time_remaining

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata=()) -> None:
        self.aborted = (code, details, dict(trailing_metadata))
        raise grpc.aio.AbortError()


async def test_the_grpc_servicer_embeds_in_order_and_its_stream_packs_vectors(gw):
    servicer = EmbeddingServicer(gw.service)
    texts = mixed_texts(70, seed=18)
    response = await servicer.Embed(pb.EmbedRequest(model=gw.model.name, inputs=texts), Context())
    assert [embedding.index for embedding in response.embeddings] == list(range(70))
    assert_rows(gw.triton, texts, [list(e.values) for e in response.embeddings], [e.token_count for e in response.embeddings])

    packed = pb.VECTOR_ENCODING_PACKED_FLOAT32
    requests = [pb.EmbedStreamRequest(id=str(i), text=text, model=gw.model.name, encoding=packed) for i, text in enumerate(texts)]
    answers = {answer.id: answer async for answer in servicer.EmbedStream(stream_of(requests), Context())}
    assert set(answers) == {str(i) for i in range(70)}
    vectors = [np.frombuffer(answers[str(i)].embedding.values_float32_le, dtype="<f4") for i in range(70)]
    assert_rows(gw.triton, texts, vectors, [answers[str(i)].embedding.token_count for i in range(70)])


async def test_the_grpc_deadline_bounds_a_stalled_call(gw):
    gw.triton.stall()
    servicer = EmbeddingServicer(gw.service)
    context = Context(time_remaining=0.1)
    with pytest.raises(grpc.aio.AbortError):
        await servicer.Embed(pb.EmbedRequest(model=gw.model.name, inputs=["stuck"]), context)
    assert context.aborted is not None
    code, _, metadata = context.aborted
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert metadata["retry-after"] == "1"
    assert gw.triton.calls[0].timeout_s <= 0.1

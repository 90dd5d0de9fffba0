"""Bad input gets a clear 4xx in the OpenAI error shape, never a 500, and the server keeps serving."""

import openai
import pytest
import requests

pytestmark = pytest.mark.e2e

MAX_BODY_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def http(service):
    with requests.Session() as session:
        session.base_url = service.http_url
        yield session


def post(http, body):
    url = f"{http.base_url}/v1/embeddings"
    if isinstance(body, bytes):
        return http.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    return http.post(url, json=body, timeout=60)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "{model}", "input": []}, 400, "input"),
        ({"model": "{model}", "input": ""}, 400, "input"),
        ({"model": "{model}", "input": ["fine", ""]}, 400, "input"),
        ({"model": "{model}", "input": [[]]}, 400, "input"),
        ({"model": "{model}", "input": 42}, 400, "input"),
        ({"model": "{model}", "input": ["text", 3]}, 400, "input"),
        ({"model": "{model}", "input": {"text": "x"}}, 400, "input"),
        ({"model": 7, "input": "x"}, 400, "model"),
        ({"input": "x"}, 400, "model"),
        ({"model": "{model}", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": "{model}", "input": "x", "dimensions": "small"}, 400, "dimensions"),
        ({"model": "{model}", "input": "x", "dimensions": 0}, 400, "dimensions"),
        ({"model": "{model}", "input": "x", "dimensions": 385}, 400, "dimensions"),
        ({"model": "{model}", "input": [[1, 2, 999999]]}, 400, "input"),
        ({"model": "{model}", "input": [-1]}, 400, "input"),
        ({"model": "no-such-model", "input": "x"}, 404, "model"),
    ],
)
def test_bad_input_is_a_clear_client_error(http, model_name, body, status, param):
    body = {k: (v.format(model=model_name) if v == "{model}" else v) for k, v in body.items()}
    response = post(http, body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"]


def test_malformed_json_is_400(http):
    response = post(http, b'{"model": "x", "input": ')
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_body_over_the_limit_is_413(http, model_name):
    text = "word " * (MAX_BODY_BYTES // 5 + 10)
    response = post(http, {"model": model_name, "input": text})
    assert response.status_code == 413
    assert "limit" in response.json()["error"]["message"]


def test_text_over_the_token_limit_names_limit_and_count(http, model_name, manifest, service):
    def encoder_executions() -> int:
        stats = requests.get(f"{service.triton_http_url}/v2/models/{model_name}-encoder/stats", timeout=10).json()
        return stats["model_stats"][0]["execution_count"]

    before = encoder_executions()
    response = post(http, {"model": model_name, "input": ["short", "word " * 300]})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "input[1]" in message and "302 tokens" in message and str(manifest["max_sequence_length"]) in message
    assert encoder_executions() == before  # the tokenizer step refused it: the encoder never ran on it


def test_truncation_option_embeds_the_first_tokens(http, model_name, manifest):
    long_text = "word " * 300
    truncated = post(http, {"model": model_name, "input": long_text, "truncate": True, "encoding_format": "float"})
    assert truncated.status_code == 200
    assert truncated.json()["usage"]["total_tokens"] == manifest["max_sequence_length"]
    # The same text cut to the limit by hand gives the same vector.
    cut = post(http, {"model": model_name, "input": "word " * (manifest["max_sequence_length"] - 2), "encoding_format": "float"})
    assert truncated.json()["data"][0]["embedding"] == cut.json()["data"][0]["embedding"]


def test_server_keeps_serving_after_bad_input(service, model_name):
    client = openai.OpenAI(base_url=f"{service.http_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=model_name, input="")
    assert len(client.embeddings.create(model=model_name, input="still here").data[0].embedding) == 384


def test_token_id_inputs_match_the_text(service, model_name, tokenizer):
    client = openai.OpenAI(base_url=f"{service.http_url}/v1", api_key="unused", max_retries=0)
    ids = tokenizer.encode("hello world", add_special_tokens=False).ids
    from_ids = client.embeddings.create(model=model_name, input=[ids, ids[:1]], encoding_format="float")
    from_text = client.embeddings.create(model=model_name, input=["hello world", "hello"], encoding_format="float")
    for a, b in zip(from_ids.data, from_text.data):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    assert from_ids.usage.total_tokens == from_text.usage.total_tokens


def test_dimensions_truncate_and_renormalize(service, model_name):
    client = openai.OpenAI(base_url=f"{service.http_url}/v1", api_key="unused", max_retries=0)
    full = client.embeddings.create(model=model_name, input="a dog runs", encoding_format="float").data[0].embedding
    short = client.embeddings.create(model=model_name, input="a dog runs", dimensions=64).data[0].embedding
    head = full[:64]
    norm = sum(v * v for v in head) ** 0.5
    assert short == pytest.approx([v / norm for v in head], abs=1e-6)


def test_models_and_health(http, model_name):
    assert [m["id"] for m in http.get(f"{http.base_url}/v1/models").json()["data"]] == [model_name]
    health = http.get(f"{http.base_url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}

"""Bad Aleph Alpha requests get a 400/404 naming the field, in JSON; a missing Triton gets 503 + Retry-After."""

import subprocess
import sys
import time

import pytest
import requests
from aleph_alpha_client import Client, Prompt, SemanticEmbeddingRequest, SemanticRepresentation

from harness.servers import ROOT, free_ports

pytestmark = pytest.mark.e2e

SEMANTIC = {"prompt": "hello", "representation": "symmetric"}


def controlled(control: dict, kind: str = "text") -> dict:
    item = {"type": "text", "data": "hi"} if kind == "text" else {"type": "token_ids", "data": [2023, 2003]}
    return {"prompt": [{**item, "controls": [control]}]}


EMBED = {"prompt": "hello", "layers": [-1], "pooling": ["mean"]}


@pytest.mark.parametrize(
    ("path", "body", "status", "field", "says"),
    [
        ("/semantic_embed", {"prompt": [{"type": "image", "data": "iVBORw0KGgo="}]}, 400, "prompt", "does not accept images"),
        (
            "/semantic_embed",
            controlled({"start": 1, "length": 2, "factor": 2.0}),
            400,
            "prompt.controls.start",
            "[1, 3) is outside",
        ),
        (
            "/semantic_embed",
            controlled({"start": -1, "length": 1, "factor": 2.0}),
            400,
            "prompt.controls.start",
            "outside its text",
        ),
        ("/semantic_embed", controlled({"start": 0, "length": 1, "factor": -0.5}), 400, "prompt.controls.factor", ">= 0"),
        (
            "/semantic_embed",
            controlled({"start": 0, "length": 1, "factor": 1, "token_overlap": "most"}),
            400,
            "prompt.controls.token_overlap",
            "'most'",
        ),
        (
            "/semantic_embed",
            controlled({"index": 2, "factor": 0.5}, "token_ids"),
            400,
            "prompt.controls.index",
            "outside its item of 2",
        ),
        ("/semantic_embed", controlled({"index": 0, "factor": "big"}, "token_ids"), 400, "prompt", ""),
        (
            "/batch_semantic_embed",
            {"prompt": None, "prompts": ["ok", controlled({"index": 0, "factor": -1}, "token_ids")["prompt"]]},
            400,
            "prompts.controls.factor",
            "'prompts[1]'",
        ),
        ("/embed", {**EMBED, **controlled({"start": 0, "length": 9, "factor": 0})}, 400, "prompt.controls.start", "outside"),
        ("/semantic_embed", {"contextual_control_threshold": "near"}, 400, "contextual_control_threshold", ""),
        ("/semantic_embed", {"hosting": "elsewhere"}, 400, "hosting", ""),
        ("/semantic_embed", {"compress_to_size": 64}, 400, "compress_to_size", "[128]"),
        ("/semantic_embed", {"representation": "sideways"}, 400, "representation", "symmetric"),
        ("/semantic_embed", {"prompt": [{"type": "token_ids", "data": [1, 999999]}]}, 400, "prompt", "999999"),
        ("/semantic_embed", {"prompt": ""}, 400, "prompt", "empty"),
        ("/semantic_embed", {"prompt": "word " * 300}, 400, "prompt", "302 tokens"),
        ("/semantic_embed", {"model": "no-such-model"}, 404, "model", "no-such-model"),
        ("/semantic_embed", {"prompt": [{"type": "video", "data": "x"}]}, 400, "prompt", ""),
        ("/semantic_embed", {"prompt": [{"data": "x"}]}, 400, "prompt", ""),
        ("/semantic_embed", {"prompt": [{"type": "token_ids", "data": "1 2"}]}, 400, "prompt", ""),
        ("/semantic_embed", {"normalize": "yes"}, 400, "normalize", ""),
        ("/semantic_embed", {"representation": None}, 400, "representation", ""),
        ("/embed", {**EMBED, "layers": ["last"]}, 400, "layers", ""),
        ("/batch_semantic_embed", {"prompt": None, "prompts": ["x"] * 101}, 400, "prompts", "100"),
        ("/batch_semantic_embed", {"prompt": None, "prompts": ["ok", [{"type": "image"}]]}, 400, "prompts", "prompts[1]"),
        ("/embed", {**EMBED, "layers": [7]}, 400, "layers", "out of range"),
        ("/embed", {**EMBED, "layers": [-8]}, 400, "layers", "out of range"),
        ("/embed", {**EMBED, "layers": []}, 400, "layers", ""),
        ("/embed", {**EMBED, "pooling": ["median"]}, 400, "pooling", "weighted_mean"),
        ("/embed", {**EMBED, "type": "symmetric"}, 400, "type", "/semantic_embed"),
        ("/detokenize", {"token_ids": [-1]}, 400, "token_ids", "vocabulary"),
        ("/tokenize", {"prompt": 5, "tokens": True, "token_ids": True}, 400, "prompt", ""),
    ],
)
def test_bad_request_names_the_field(service, model_name, path, body, status, field, says):
    base = SEMANTIC if "semantic" in path else {}
    payload = {k: v for k, v in {"model": model_name, **base, **body}.items() if v is not None}
    response = requests.post(f"{service.http_url}{path}", json=payload, timeout=60)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()
    assert error["field"] == field
    assert says in error["error"]


def test_nice_must_be_a_boolean(service, model_name):
    response = requests.post(f"{service.http_url}/semantic_embed?nice=maybe", json={"model": model_name, **SEMANTIC}, timeout=60)
    assert response.status_code == 400
    assert response.json()["field"] == "nice"


def test_unknown_tokenizer_model_is_404(service):
    response = requests.get(f"{service.http_url}/models/no-such-model/tokenizer", timeout=60)
    assert response.status_code == 404
    assert response.json()["field"] == "model"


def test_client_sees_a_value_error_for_a_400(service, model_name):
    client = Client(token="unused", host=service.http_url, total_retries=0)
    prompt = Prompt.from_text("hi")
    request = SemanticEmbeddingRequest(prompt=prompt, representation=SemanticRepresentation.Query, compress_to_size=9)
    with pytest.raises(ValueError, match="compress_to_size"):
        client.semantic_embed(request, model=model_name)


def test_unreachable_triton_is_503_with_retry_after(tmp_path, model_name):
    """A gateway pointed at a Triton that is not there answers 503 + Retry-After, which both clients retry."""
    http_port, grpc_port, dead_triton_port = free_ports(3)
    command = [
        sys.executable,
        "-m",
        "gateway",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--triton-url=127.0.0.1:{dead_triton_port}",
        f"--run-dir={tmp_path}",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{url}/version", timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and process.poll() is None, "gateway did not start"
                time.sleep(0.2)
        response = requests.post(f"{url}/semantic_embed", json={"model": model_name, **SEMANTIC}, timeout=60)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "2"
        assert response.json()["code"] == "UNAVAILABLE"
    finally:
        process.terminate()
        process.wait(timeout=30)

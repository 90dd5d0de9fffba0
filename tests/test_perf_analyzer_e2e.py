"""The real perf_analyzer (bin/setup's .venv/bin/perf_analyzer) against the session's Triton and gateway.

Each run sends a fixed number of requests and checks every answer against the input data's validation_data:
perf_analyzer compares outputs byte for byte and fails the run on the first mismatch, which the runs with a wrong
expectation show. The expected vectors are recorded from the session's Triton one text at a time (the committed
file holds the bits of the machine that made it, and this one's CPU may round otherwise), so a run under load also
proves that batching changes no bit of any answer.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from bench.perf_analyzer import runner
from bench.perf_analyzer.make_input_data import OUTPUT, expected_vectors, record_gateway, record_triton, render, token_counts
from export.datasets import sts_sentences
from harness.servers import MODEL_REPOSITORY
from repository_contract.tensors import TEXT, TOKEN_COUNT

REQUESTS = 300
CONCURRENCY = 16
# The gateway's answers are recorded for the first sentences only: recording asks one text at a time.
RECORDED = 64
MISMATCH = "Output doesn't match expected output"


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads(OUTPUT.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def recorded_ensemble(service, manifest) -> tuple[list[str], list[int], list[np.ndarray]]:
    """Every STS sentence, its token count, and the vector the session's Triton gives it alone."""
    texts = sts_sentences()
    return (
        texts,
        token_counts(MODEL_REPOSITORY, texts),
        record_triton(service.triton_grpc_url, manifest["ensembles"]["text"], texts),
    )


def test_committed_input_data_is_every_sts_sentence_with_its_token_count(committed):
    texts = sts_sentences()
    assert [r[TEXT]["content"] for r in committed["data"]] == [[t] for t in texts]
    assert [v[TOKEN_COUNT]["content"] for v in committed["validation_data"]] == [
        [n] for n in token_counts(MODEL_REPOSITORY, texts)
    ], "run `python -m bench.perf_analyzer.make_input_data --triton HOST:PORT`"


@pytest.mark.e2e
def test_committed_vectors_are_what_this_export_answers_up_to_a_cpus_rounding(committed, recorded_ensemble):
    served = np.stack(recorded_ensemble[2])
    expected = expected_vectors(committed)
    identical = int((expected == served).all(axis=1).sum())
    # Another CPU's kernels round differently in the last bits; a stale or wrong file differs by orders of magnitude more.
    np.testing.assert_allclose(expected, served, rtol=0, atol=1e-5, err_msg=f"{identical} of {len(served)} vectors bit-identical")


@pytest.mark.e2e
def test_committed_input_data_fits_the_ensemble(service, manifest):
    import tritonclient.grpc as tritongrpc

    client = tritongrpc.InferenceServerClient(service.triton_grpc_url)
    try:
        config = client.get_model_config(manifest["ensembles"]["text"], as_json=True)["config"]
    finally:
        client.close()
    document = json.loads(OUTPUT.read_text(encoding="utf-8"))
    (expected_input,) = config["input"]
    outputs = {o["name"]: (o["data_type"], o["dims"]) for o in config["output"]}
    assert (expected_input["name"], expected_input["data_type"], expected_input["dims"]) == (TEXT, "TYPE_STRING", ["1"])
    assert outputs[TOKEN_COUNT] == ("TYPE_INT32", ["1"])
    assert len(document["data"]) == len(document["validation_data"]) == len(sts_sentences())
    assert all(r[TEXT]["shape"] == [1] and len(r[TEXT]["content"]) == 1 for r in document["data"])


def _passes(run: runner.Run, requests: int = REQUESTS) -> None:
    assert run.returncode == 0, run.output[-3000:]
    assert MISMATCH not in run.output
    assert len(run.requests) == requests, f"{len(run.requests)} requests measured"
    assert all(len(r["response_timestamps"]) == 1 for r in run.requests)
    assert run.throughput > 0


def _fails_validation(run: runner.Run) -> None:
    assert run.returncode != 0 and MISMATCH in run.output, run.output[-3000:]


@pytest.mark.e2e
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_every_answer_under_load_equals_the_one_given_alone_bit_for_bit(service, manifest, recorded_ensemble, protocol, tmp_path):
    input_data = tmp_path / "recorded.json"
    input_data.write_text(render(*recorded_ensemble))
    url = service.triton_grpc_url if protocol == "grpc" else f"127.0.0.1:{service.triton_http_port}"
    target = runner.ensemble_arguments(manifest["ensembles"]["text"], protocol, url, input_data)
    run = runner.run(target, 32, runner.Load(request_count=REQUESTS), tmp_path / "run")
    _passes(run)
    # What perf_analyzer compared, read back from its profile: each text's token count as the tokenizer gives it.
    texts = [r["request_inputs"][TEXT] for r in run.requests]
    assert [r["response_outputs"][0][TOKEN_COUNT] for r in run.requests] == token_counts(MODEL_REPOSITORY, texts)


def _one_bit_off(vector: np.ndarray) -> np.ndarray:
    wrong = np.array(vector, dtype="<f4")
    wrong.view("<u4")[7] ^= 1
    return wrong


@pytest.mark.e2e
@pytest.mark.parametrize("wrong", ["token_count", "embedding"])
def test_a_wrong_expected_output_fails_the_run(service, manifest, recorded_ensemble, wrong, tmp_path):
    texts, counts, vectors = recorded_ensemble
    if wrong == "token_count":
        counts = [counts[0] + 1, *counts[1:]]
    else:
        vectors = [_one_bit_off(vectors[0]), *vectors[1:]]
    input_data = tmp_path / "wrong.json"
    input_data.write_text(render(texts, counts, vectors))
    target = runner.ensemble_arguments(manifest["ensembles"]["text"], "http", f"127.0.0.1:{service.triton_http_port}", input_data)
    _fails_validation(runner.run(target, CONCURRENCY, runner.Load(request_count=REQUESTS), tmp_path / "run"))


@pytest.fixture(scope="module")
def recorded_gateway(service, model_name) -> dict:
    return json.loads(record_gateway(service.http_url, model_name, sts_sentences()[:RECORDED]))


@pytest.mark.e2e
def test_perf_analyzer_openai_kind_drives_the_gateway_with_every_response_checked(
    service, model_name, recorded_gateway, tmp_path
):
    input_data = tmp_path / "gateway.json"
    input_data.write_text(json.dumps(recorded_gateway))
    run = runner.run(
        runner.gateway_arguments(model_name, f"127.0.0.1:{service.http_port}", input_data),
        CONCURRENCY,
        runner.Load(request_count=REQUESTS),
        tmp_path / "run",
    )
    _passes(run)
    # The recorded responses themselves are the served vectors: 384 little-endian floats of unit length.
    first = recorded_gateway["validation_data"][0]["response"]["content"][0]["data"][0]["embedding"]
    vector = np.frombuffer(base64.b64decode(first), dtype="<f4")
    assert vector.shape == (384,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-5


@pytest.mark.e2e
def test_a_wrong_expected_gateway_response_fails_the_run(service, model_name, recorded_gateway, tmp_path):
    wrong = json.loads(json.dumps(recorded_gateway))
    item = wrong["validation_data"][0]["response"]["content"][0]["data"][0]
    item["embedding"] = base64.b64encode(
        _one_bit_off(np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")).tobytes()
    ).decode()
    input_data = tmp_path / "wrong.json"
    input_data.write_text(json.dumps(wrong))
    run = runner.run(
        runner.gateway_arguments(model_name, f"127.0.0.1:{service.http_port}", input_data),
        CONCURRENCY,
        runner.Load(request_count=REQUESTS),
        tmp_path / "run",
    )
    _fails_validation(run)

"""Direct Triton access: what tritonclient and perf_analyzer users get equals what the gateway serves."""

import json

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tritongrpc

from bench.perf_analyzer.make_input_data import OUTPUT, render
from export.datasets import sts_sentences
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc


def test_perf_analyzer_input_data_is_the_sts_sentences():
    assert OUTPUT.read_text(encoding="utf-8") == render(sts_sentences()), "run `python -m bench.perf_analyzer.make_input_data`"


@pytest.fixture(scope="module")
def triton(service):
    client = tritongrpc.InferenceServerClient(service.triton_grpc_url)
    yield client
    client.close()


def test_perf_analyzer_input_data_fits_the_ensemble_input(triton, manifest):
    (expected,) = triton.get_model_config(manifest["ensembles"]["text"], as_json=True)["config"]["input"]
    requests = json.loads(OUTPUT.read_text(encoding="utf-8"))["data"]
    assert len(requests) == len(sts_sentences())
    assert (expected["name"], expected["data_type"], expected["dims"]) == ("TEXT", "TYPE_STRING", ["1"])
    assert all(list(r) == ["TEXT"] and r["TEXT"]["shape"] == [1] and len(r["TEXT"]["content"]) == 1 for r in requests)


def test_raw_tritonclient_call_on_the_ensemble_equals_the_gateway(service, triton, manifest):
    texts = [r["TEXT"]["content"][0] for r in json.loads(OUTPUT.read_text(encoding="utf-8"))["data"][:8]]
    text = tritongrpc.InferInput("TEXT", [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_).reshape(-1, 1))
    result = triton.infer(manifest["ensembles"]["text"], [text], outputs=[tritongrpc.InferRequestedOutput("EMBEDDING")])
    raw = result.as_numpy("EMBEDDING")

    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        response = pb_grpc.EmbeddingServiceStub(channel).Embed(pb.EmbedRequest(model=manifest["name"], inputs=texts))
    served = np.array([e.values for e in response.embeddings], dtype=np.float32)
    assert raw.dtype == np.float32 and raw.shape == (8, manifest["dimensions"])
    np.testing.assert_array_equal(raw, served)

"""Direct Triton access: what tritonclient users get equals what the gateway serves (perf_analyzer: test_perf_analyzer_e2e)."""

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tritongrpc

from export.datasets import sts_sentences
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc
from repository_contract.tensors import EMBEDDING, TEXT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def triton(service):
    client = tritongrpc.InferenceServerClient(service.triton_grpc_url)
    yield client
    client.close()


def test_raw_tritonclient_call_on_the_ensemble_equals_the_gateway(service, triton, manifest):
    texts = sts_sentences()[:8]
    text = tritongrpc.InferInput(TEXT, [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_).reshape(-1, 1))
    result = triton.infer(manifest["ensembles"]["text"], [text], outputs=[tritongrpc.InferRequestedOutput(EMBEDDING)])
    raw = result.as_numpy(EMBEDDING)

    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        response = pb_grpc.EmbeddingServiceStub(channel).Embed(pb.EmbedRequest(model=manifest["name"], inputs=texts))
    served = np.array([e.values for e in response.embeddings], dtype=np.float32)
    assert raw.dtype == np.float32 and raw.shape == (8, manifest["dimensions"])
    np.testing.assert_array_equal(raw, served)

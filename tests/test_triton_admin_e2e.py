"""End to end: the Triton the gateway starts answers its admin APIs only to callers with the admin key.

Anyone who reached Triton's loopback ports could unload a model (an outage until the gateway restarts Triton) or
load one from a repository of their making (its code runs in Triton), register shared memory, or point Triton's
trace and log files anywhere. Those APIs now need the key (gateway.triton.process.RESTRICTED_APIS), which the
operator finds in the run directory; inference, health, metadata, model config and statistics stay open.

The service is this module's own: were the restriction missing, the refused calls would unload models under every
other test.
"""

from __future__ import annotations

import base64
import stat

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from gateway.triton.process import ADMIN_KEY_GRPC_METADATA, ADMIN_KEY_HEADER
from harness.servers import start_service
from repository_contract.tensors import EMBEDDING, TEXT

pytestmark = pytest.mark.e2e

# A caller's own model files, which Triton would load and run were the load let through (harmless here).
CRAFTED_FILES = {"file:1/model.py": base64.b64encode(b"raise SystemExit('a caller-supplied model must never load')\n").decode()}
CRAFTED_CONFIG = '{"name": "crafted", "backend": "python", "max_batch_size": 0}'


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    service = start_service(tmp_path_factory.mktemp("triton-admin"))
    yield service
    service.stop()


@pytest.fixture(scope="module")
def admin_key(running) -> str:
    return (running.run_dir / "triton-admin-key").read_text().strip()


@pytest.fixture
def triton_grpc(running):
    client = grpcclient.InferenceServerClient(running.triton_grpc_url)
    yield client
    client.close()


def assert_still_serving(running, model_name: str) -> None:
    assert requests.get(f"{running.triton_http_url}/v2/models/{model_name}/ready", timeout=10).status_code == 200
    response = requests.post(f"{running.http_url}/v1/embeddings", json={"model": model_name, "input": "still here?"}, timeout=30)
    assert response.status_code == 200, response.text


def assert_http_refused(response: requests.Response) -> None:
    assert response.status_code == 403, (response.status_code, response.text)
    assert "restricted" in response.text and ADMIN_KEY_HEADER in response.text


def assert_grpc_refused(call) -> None:
    with pytest.raises(InferenceServerException) as error:
        call()
    assert "restricted" in error.value.message() and ADMIN_KEY_GRPC_METADATA in error.value.message(), error.value


@pytest.mark.parametrize("headers", [{}, {ADMIN_KEY_HEADER: "not-the-key-0123456789"}], ids=["no key", "wrong key"])
def test_unload_and_load_over_http_without_the_key_are_refused_and_the_ensemble_keeps_serving(running, model_name, headers):
    models = f"{running.triton_http_url}/v2/repository/models"
    assert_http_refused(requests.post(f"{models}/{model_name}/unload", json={}, headers=headers, timeout=10))
    crafted = {"parameters": {"config": CRAFTED_CONFIG, **CRAFTED_FILES}}
    assert_http_refused(requests.post(f"{models}/crafted/load", json=crafted, headers=headers, timeout=10))
    assert_http_refused(requests.post(f"{models}/{model_name}/load", json={}, headers=headers, timeout=10))
    assert_http_refused(requests.post(f"{running.triton_http_url}/v2/repository/index", json={}, headers=headers, timeout=10))
    assert_still_serving(running, model_name)


@pytest.mark.parametrize("headers", [None, {ADMIN_KEY_GRPC_METADATA: "not-the-key-0123456789"}], ids=["no key", "wrong key"])
def test_unload_and_load_over_grpc_without_the_key_are_refused_and_the_ensemble_keeps_serving(
    running, triton_grpc, model_name, headers
):
    assert_grpc_refused(lambda: triton_grpc.unload_model(model_name, headers=headers))
    files = {name: base64.b64decode(content) for name, content in CRAFTED_FILES.items()}
    assert_grpc_refused(lambda: triton_grpc.load_model("crafted", headers=headers, config=CRAFTED_CONFIG, files=files))
    assert_grpc_refused(lambda: triton_grpc.get_model_repository_index(headers=headers))
    assert_still_serving(running, model_name)


def test_shared_memory_trace_and_logging_without_the_key_are_refused(running, triton_grpc):
    base = running.triton_http_url
    shm = {"key": "/no-such-region", "offset": 0, "byte_size": 64}
    assert_http_refused(requests.post(f"{base}/v2/systemsharedmemory/region/probe/register", json=shm, timeout=10))
    assert_http_refused(requests.post(f"{base}/v2/trace/setting", json={"trace_level": ["OFF"]}, timeout=10))
    assert_http_refused(requests.post(f"{base}/v2/logging", json={"log_verbose_level": 0}, timeout=10))
    assert_http_refused(requests.get(f"{base}/v2/logging", timeout=10))
    assert_grpc_refused(lambda: triton_grpc.register_system_shared_memory("probe", "/no-such-region", 64))
    assert_grpc_refused(lambda: triton_grpc.update_trace_settings(settings={"trace_level": ["OFF"]}))
    assert_grpc_refused(lambda: triton_grpc.update_log_settings({"log_verbose_level": 0}))


def test_inference_health_metadata_config_and_statistics_stay_open(running, triton_grpc, model_name):
    base = running.triton_http_url
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2",
        f"/v2/models/{model_name}",
        f"/v2/models/{model_name}/config",
        f"/v2/models/{model_name}/stats",
    ):
        assert requests.get(base + path, timeout=10).status_code == 200, path
    assert triton_grpc.is_server_live() and triton_grpc.is_server_ready() and triton_grpc.is_model_ready(model_name)
    assert triton_grpc.get_server_metadata().name == "triton"
    assert triton_grpc.get_model_metadata(model_name).name == model_name
    assert triton_grpc.get_model_config(model_name).config.name == model_name
    assert triton_grpc.get_inference_statistics(model_name).model_stats[0].name == model_name
    text = grpcclient.InferInput(TEXT, [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"hello world"]], dtype=object))
    assert triton_grpc.infer(model_name, [text]).as_numpy(EMBEDDING).shape[0] == 1
    body = {"inputs": [{"name": TEXT, "shape": [1, 1], "datatype": "BYTES", "data": ["hello world"]}]}
    assert requests.post(f"{base}/v2/models/{model_name}/infer", json=body, timeout=30).status_code == 200


def test_the_operator_finds_the_key_in_the_run_directory_and_it_opens_the_admin_apis(running, triton_grpc, admin_key, model_name):
    key_file = running.run_dir / "triton-admin-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    headers = {ADMIN_KEY_HEADER: admin_key}
    index = requests.post(f"{running.triton_http_url}/v2/repository/index", json={}, headers=headers, timeout=10)
    assert index.status_code == 200 and model_name in {m["name"] for m in index.json()}
    assert requests.get(f"{running.triton_http_url}/v2/logging", headers=headers, timeout=10).status_code == 200
    metadata = {ADMIN_KEY_GRPC_METADATA: admin_key}
    assert model_name in {m.name for m in triton_grpc.get_model_repository_index(headers=metadata).models}
    assert "log_verbose_level" in triton_grpc.get_log_settings(headers=metadata, as_json=True)["settings"]


def test_run_triton_takes_the_key_from_the_environment(tmp_path, model_name):
    """A Triton pod (deploy.images.run_triton) with EMBED_TRITON_ADMIN_KEY from a Secret: that key, and only it."""
    from tests.test_run_triton_e2e import running_triton

    key = "operator-key-from-a-secret-0123"
    with running_triton(tmp_path, {"EMBED_TRITON_ADMIN_KEY": key}) as run:
        base = f"http://127.0.0.1:{run.http_port}"
        assert_http_refused(requests.post(f"{base}/v2/repository/models/{model_name}/unload", json={}, timeout=10))
        index = requests.post(f"{base}/v2/repository/index", json={}, headers={ADMIN_KEY_HEADER: key}, timeout=10)
        assert index.status_code == 200 and model_name in {m["name"] for m in index.json()}
        assert (run.run_dir / "triton-admin-key").read_text().strip() == key
        assert key not in run.log_tail(100_000), "the key must not be logged"
        assert requests.get(f"{base}/v2/models/{model_name}/ready", timeout=10).status_code == 200

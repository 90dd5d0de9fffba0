"""A real Prometheus server scrapes the gateway and its Triton; PromQL sees exactly the requests this test sent."""

from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from harness.prometheus_server import PrometheusServer
from harness.servers import HttpApi

pytestmark = pytest.mark.e2e

SENT = 7


def _value(result: list[dict]) -> float:
    return float(result[0]["value"][1]) if result else 0.0


def _gateway_count(service, labels: dict[str, str]) -> float:
    exposition = requests.get(f"{service.http_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "embed_gateway_requests_total" and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@pytest.fixture(scope="module")
def prometheus(service):
    targets = {"gateway": [f"127.0.0.1:{service.http_port}"], "triton": [f"127.0.0.1:{service.triton_metrics_port}"]}
    with PrometheusServer(targets, scrape_interval_s=1) as server:
        server.wait_for('sum(up{job=~"gateway|triton"})', lambda result: _value(result) == 2, timeout_s=30)
        yield server


def test_prometheus_counts_the_requests_sent_by_contract_route_and_status(service, prometheus, model_name):
    labels = {"contract": "openai", "route": "/v1/embeddings", "status": "200"}
    query = 'sum(embed_gateway_requests_total{contract="openai", route="/v1/embeddings", status="200"})'
    baseline = _gateway_count(service, labels)  # other tests' requests, read from the gateway itself
    with HttpApi(service.http_url) as http:
        for index in range(SENT):
            assert http.post("/v1/embeddings", json={"model": model_name, "input": [f"text {index}", "two"]}).status_code == 200
        refused = http.post("/v1/embeddings", json={"model": model_name, "input": []})
        assert refused.status_code == 400
    prometheus.wait_for(query, lambda result: _value(result) == baseline + SENT, timeout_s=20)
    invalid = 'sum(embed_gateway_requests_total{route="/v1/embeddings", status="400"})'
    assert _value(prometheus.query(invalid)) >= 1
    assert _value(prometheus.query('sum(embed_gateway_rejections_total{reason="invalid"})')) >= 1


def test_prometheus_scrapes_tritons_own_metrics_and_the_gateway_reports_it_up(prometheus):
    prometheus.wait_for("sum(nv_inference_request_success)", lambda result: _value(result) > 0, timeout_s=20)
    assert _value(prometheus.query("embed_gateway_triton_up")) == 1
    histogram = prometheus.query("sum(embed_gateway_request_duration_seconds_count)")
    assert _value(histogram) > 0

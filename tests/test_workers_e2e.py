"""End to end: `--workers 2` runs two gateway processes on the same HTTP and gRPC ports over one Triton that the parent
supervises. Both take connections, /metrics (whichever worker answers it) reports the host, a worker that dies is
started again while the other serves, a Triton that dies is started again by the parent, and SIGTERM lets every worker
finish its requests before all of them and Triton exit."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
import requests
from prometheus_client import multiprocess
from prometheus_client.parser import text_string_to_metric_families

from bench.workload import sentences
from harness.scrape import sample_sum
from harness.servers import RunningService, start_service, starts_servers
from harness.waiting import wait_until
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"
TEXTS = sentences()


@pytest.fixture
@starts_servers
def host(tmp_path):
    running = start_service(tmp_path / "host", extra_args=["--workers", "2"])
    yield running
    running.stop()


def worker_pids(service: RunningService) -> list[int]:
    """The parent's children that are gateways (Triton is the other one)."""
    children = Path(f"/proc/{service.process.pid}/task/{service.process.pid}/children").read_text().split()
    return sorted(int(pid) for pid in children if b"gateway" in Path(f"/proc/{pid}/cmdline").read_bytes())


def alive(pid: int) -> bool:
    """Running: not gone, and not a zombie (which holds no descriptor any more)."""
    try:
        return b"zombie" not in Path(f"/proc/{pid}/status").read_bytes().lower()
    except FileNotFoundError:
        return False


def embed(service: RunningService, text: str) -> requests.Response:
    # A new connection per request: connections are what the workers share out.
    return requests.post(f"{service.http_url}/v1/embeddings", json={"model": MODEL, "input": text}, timeout=60)


def requests_by_worker(service: RunningService) -> dict[int, float]:
    """Each worker's own count of embedding requests answered, from its file in the shared metrics directory."""
    counts = {}
    for pid in worker_pids(service):
        files = [str(path) for path in (service.run_dir / "metrics").glob(f"counter_{pid}.db")]
        families = multiprocess.MultiProcessCollector.merge(files, accumulate=False)
        counts[pid] = sample_sum(families, "embed_gateway_requests_total", lambda labels: labels.get("route") == "/v1/embeddings")
    return counts


def host_metric(service: RunningService, name: str, **labels: str) -> float:
    text = requests.get(f"{service.http_url}/metrics", timeout=10).text
    return sample_sum(text_string_to_metric_families(text), name, lambda sample: labels.items() <= sample.items())


def test_both_workers_take_connections_and_metrics_report_the_host(host):
    assert len(worker_pids(host)) == 2
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda text: embed(host, text), TEXTS[:200]))
    assert [answer.status_code for answer in answers] == [200] * 200
    by_worker = requests_by_worker(host)
    assert sum(by_worker.values()) == 200 and all(count > 0 for count in by_worker.values()), by_worker
    # Whichever worker answers /metrics, it counts both.
    for _ in range(4):
        total = host_metric(host, "embed_gateway_requests_total", contract="openai", route="/v1/embeddings", status="200")
        assert total == 200
    with grpc.insecure_channel(f"127.0.0.1:{host.grpc_port}") as channel:
        reply = pb_grpc.EmbeddingServiceStub(channel).Embed(pb.EmbedRequest(model=MODEL, inputs=TEXTS[:3]), timeout=60)
    assert len(reply.embeddings) == 3


def test_a_worker_that_dies_is_started_again_while_the_other_serves(host):
    first, second = worker_pids(host)
    os.kill(first, signal.SIGKILL)
    # A connection the worker took in the instant before it died dies with it; once it is gone, every request is
    # answered: the other worker takes each new connection from the sockets they share.
    wait_until(lambda: not alive(first), 10, what="the killed worker gone")
    answers = [embed(host, text) for text in TEXTS[:20]]
    assert [answer.status_code for answer in answers] == [200] * 20
    wait_until(lambda: len(worker_pids(host)) == 2 and first not in worker_pids(host), 30, what="the worker started again")
    (restarted,) = set(worker_pids(host)) - {second}
    wait_until(lambda: {"0.ready", "1.ready"} <= {p.name for p in (host.run_dir / "workers").iterdir()}, 60)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda text: embed(host, text), TEXTS[:100]))
    assert [answer.status_code for answer in answers] == [200] * 100
    assert requests_by_worker(host)[restarted] > 0, "the restarted worker took no connection"
    assert f"(pid {first}) exited with -9; starting it again" in (host.run_dir / "gateway.log").read_text()


def test_a_triton_that_dies_is_started_again_by_the_parent(host):
    pid = int((host.run_dir / "triton.pid").read_text())
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: (host.run_dir / "triton.pid").exists() and int((host.run_dir / "triton.pid").read_text()) != pid, 60)
    wait_until(lambda: embed(host, "after the restart").status_code == 200, 120, what="an answer from the new Triton")
    assert host_metric(host, "embed_gateway_triton_restarts_total") >= 1


def test_sigterm_lets_every_worker_finish_its_requests_then_all_exit(host):
    workers = worker_pids(host)
    triton = int((host.run_dir / "triton.pid").read_text())
    # Seconds of encoding, inside the 15 s shutdown grace on a slow CPU too: on an AVX2 one (about 110 texts/s)
    # 2 x 1000 texts outlasted it and were answered 503; 2 x 500 finish.
    big = TEXTS[:500]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        in_flight = [
            pool.submit(requests.post, f"{host.http_url}/v1/embeddings", json={"model": MODEL, "input": big}, timeout=120)
            for _ in range(2)
        ]
        wait_until(lambda: host_metric(host, "embed_gateway_requests_in_flight", contract="openai") == 2, 30)
        host.process.send_signal(signal.SIGTERM)
        answers = [future.result() for future in in_flight]
    assert [answer.status_code for answer in answers] == [200, 200]
    assert all(len(answer.json()["data"]) == len(big) for answer in answers)
    assert host.process.wait(timeout=60) == 0
    assert not any(alive(pid) for pid in [*workers, triton])
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{host.http_url}/health", timeout=5)


def test_a_worker_that_cannot_serve_ends_the_start_with_its_error(tmp_path):
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="gateway exited early"):
        # A worker opens the token store; one that is not a database fails every worker before it serves.
        (tmp_path / "auth.sqlite3").write_text("not a database")
        start_service(tmp_path / "run", extra_args=["--workers", "2", "--auth", f"--auth-database={tmp_path / 'auth.sqlite3'}"])
    assert time.monotonic() - started < 120

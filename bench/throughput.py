"""Throughput suite: the service against raw onnxruntime and infinity-emb, measured in one run.

    bin/bench                      # the full run, about 10 minutes; writes bench/results/throughput.*
    bin/bench --smoke --out DIR    # seconds per step: proves the suite works (the test suite runs it)

Order of a run, each step printed as it starts:
1. raw onnxruntime in this process, fp32: the ceiling every service figure is divided by;
2. the service (gateway + Triton) on the default export: single-text requests at several concurrencies
   and 100-text requests, over HTTP float, HTTP base64 and gRPC; then passages; then single sentences over
   /semantic_embed without and with an attention control on a content word (the controlled path); and repeated
   queries, single sentences drawn with a Zipf law (exponent 1.1), without the embedding cache;
2b. the same repeated queries through a service with the Redis embedding cache on (a throwaway redis-server),
   starting cold: its hit rate and its throughput against cache off;
3. the pipeline ceiling: the same service on a bench-only copy of the export whose encoder answers zeros at
   no cost (bench/pipeline_ceiling.py), single texts over HTTP float at c1, c32 and c128 and gRPC at c128:
   the most the rest of the pipeline can carry;
4. infinity-emb (torch engine, CPU, same model) under the same load;
5. the int8 export: raw onnxruntime, the service (single texts at c1 and c32, 100-text requests).
STS Spearman is measured beside each: raw onnxruntime, each service and infinity-emb, and the report puts them in one
ladder (raw fp32, the yardstick; raw int8; the services; infinity-emb) with issue 26's targets.
Memory (RSS of the gateway, and of Triton with its stubs) is sampled idle and under load.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench import infinity_peer, pipeline_ceiling, requests, workload
from bench.cli import command_line, fresh_work_dir
from bench.control_effect import content_word_cases
from bench.machine import describe
from bench.process_stats import PeakSampler, cpu_seconds, machine_ticks, rss_mib
from bench.raw_onnxruntime import RawEncoder
from bench.report import CACHE_LABEL, write_report
from bench.sts_quality import pair_cosines, served, spearman
from export.datasets import read_sts_pairs
from export.source_model import default_model_path
from harness.redis_server import RedisServer
from harness.servers import ROOT, RunningService, free_ports, start_service

RESULTS = ROOT / "bench" / "results"


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class Plan:
    warmup_s: float
    duration_s: float
    concurrencies: list[int]
    headline_concurrency: int  # the single-text point that the int8 and peer comparisons use
    batch_concurrency: int
    raw_batch_sizes: list[int]
    raw_texts: int
    protocols: list[tuple[str, str]]
    passages_per_request: int
    ceiling_points: list[tuple[str, str, int]]  # (protocol, encoding, concurrency) of the single-text ceiling runs

    @staticmethod
    def full() -> Plan:
        return Plan(
            3.0,
            12.0,
            [1, 8, 32, 128],
            32,
            4,
            [1, 8, 16, 32, 64, 128],
            1030,
            [("http", "float"), ("http", "base64"), ("grpc", "float")],
            25,
            [("http", "float", 1), ("http", "float", 32), ("http", "float", 128), ("grpc", "float", 128)],
        )

    @staticmethod
    def smoke() -> Plan:
        # Only requests that start and end inside the window count, so the window must hold a few of the
        # slowest (a 5-passage request on a cold server); a 1 s warm-up takes the cold start. Where one request
        # takes longer than the window, the load generator waits for it (bench.loadgen).
        return Plan(
            1.0,
            2.5,
            [1, 8],
            8,
            2,
            [1, 32],
            128,
            [("http", "float"), ("grpc", "float")],
            5,
            [("http", "float", 1), ("http", "float", 8), ("grpc", "float", 8)],
        )


@dataclass
class Measurement:
    server: str
    protocol: str
    encoding: str
    corpus: str
    texts_per_request: int
    concurrency: int
    requests_per_s: float
    texts_per_s: float
    p50_ms: float
    p99_ms: float
    loadgen_cpu_share: float
    errors: int
    first_error: str | None
    encoder_batch: float | None = None
    memory_mib: dict[str, float] = field(default_factory=dict)
    # Share of one core each server component used over the run (warm-up included).
    cpu_share: dict[str, float] = field(default_factory=dict)
    # Shares of the whole machine over the run: left idle, and stolen by the hypervisor.
    machine_idle: float = 0.0
    machine_steal: float = 0.0


def _encoder_counts(service: RunningService) -> tuple[int, int]:
    """Inferences and executions of every served model's encoder step (one model in a bench repository)."""
    with urllib.request.urlopen(f"{service.triton_http_url}/v2/models/stats", timeout=10) as response:
        encoders = [s for s in json.loads(response.read())["model_stats"] if s["name"].endswith("-encoder")]
    return sum(int(s["inference_count"]) for s in encoders), sum(int(s["execution_count"]) for s in encoders)


def run_load(spec: dict, work: Path) -> dict:
    """One load generator run in its own process: its result (requests/s, latencies, errors)."""
    spec_path, result_path = work / "spec.pickle", work / "result.json"
    spec_path.write_bytes(pickle.dumps(spec))
    timeout = spec["warmup_s"] + spec["duration_s"] + 120
    subprocess.run(
        [sys.executable, "-m", "bench.loadgen", str(spec_path), str(result_path)], cwd=ROOT, check=True, timeout=timeout
    )
    return json.loads(result_path.read_text())


class Runner:
    def __init__(self, plan: Plan, work: Path):
        self.plan = plan
        self.work = work
        self.measurements: list[Measurement] = []

    def measure(
        self,
        server: str,
        port: int,
        protocol: str,
        encoding: str,
        corpus: str,
        bodies: list[bytes],
        texts_per_request: int,
        concurrency: int,
        pids: dict[str, tuple[int, bool]],
        service: RunningService | None = None,
        target: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Measurement:
        spec = {
            "protocol": protocol,
            "port": port,
            "bodies": bodies,
            "concurrency": concurrency,
            "target": target or (requests.GRPC_EMBED if protocol == "grpc" else "/v1/embeddings"),
            "warmup_s": self.plan.warmup_s,
            "duration_s": self.plan.duration_s,
            "max_requests": 500_000,
            "headers": headers or {},
        }
        before = _encoder_counts(service) if service else None
        cpu_root = next(iter(pids.values()))[0]
        cpu_before, ticks_before, started = cpu_seconds(cpu_root), machine_ticks(), time.monotonic()
        with PeakSampler(pids) as memory:
            result = run_load(spec, self.work)
        elapsed, cpu_after = time.monotonic() - started, cpu_seconds(cpu_root)
        idle, steal, total = (after - before for after, before in zip(machine_ticks(), ticks_before))
        cpu_share = {
            k: round((v - cpu_before.get(k, 0.0)) / elapsed, 3) for k, v in cpu_after.items() if v > cpu_before.get(k, 0.0)
        }
        batch = None
        if service:
            after = _encoder_counts(service)
            executions = after[1] - before[1]
            batch = (after[0] - before[0]) / executions if executions else None
        m = Measurement(
            server,
            protocol,
            encoding,
            corpus,
            texts_per_request,
            concurrency,
            result["requests_per_s"],
            result["requests_per_s"] * texts_per_request,
            result["p50_ms"],
            result["p99_ms"],
            result["loadgen_cpu_share"],
            result["errors"],
            result["first_error"],
            batch,
            {k: round(v, 1) for k, v in memory.peaks.items()},
            cpu_share,
            round(idle / total, 3),
            round(steal / total, 3),
        )
        self.measurements.append(m)
        progress(
            f"  {server} {protocol} {encoding} {corpus} x{texts_per_request} c{concurrency}: {m.texts_per_s:.0f} texts/s, "
            f"p50 {m.p50_ms:.1f} ms, p99 {m.p99_ms:.1f} ms, load generator {100 * m.loadgen_cpu_share:.0f}% of a core"
            + (f", {m.errors} errors: {m.first_error}" if m.errors else "")
        )
        return m


def service_pids(service: RunningService) -> dict[str, tuple[int, bool]]:
    """The gateway on its own (Triton is its child), and Triton with its Python-backend stubs."""
    return {"gateway": (service.process.pid, False), "triton": (int((service.run_dir / "triton.pid").read_text()), True)}


@contextmanager
def serving(runner: Runner, label: str, repository: Path, gateway_args: list[str] = ()):
    """A service on `repository` for the block, its logs in the run's work dir under `label`."""
    progress(f"starting the service on {repository}")
    service = start_service(runner.work / label.replace(" ", "-"), repository, list(gateway_args))
    try:
        yield service
    finally:
        service.stop()


def served_model(repository: Path) -> str:
    return json.loads(next(repository.glob("*/embedding_manifest.json")).read_text())["name"]


def endpoint(service: RunningService, protocol: str):
    """The service's port for `protocol` and the function that builds its request bodies."""
    if protocol == "grpc":
        return service.grpc_port, requests.grpc_bodies
    return service.http_port, requests.openai_bodies


def run_service(runner: Runner, label: str, repository: Path, texts: list[str], passages: list[str], full_matrix: bool) -> dict:
    """Drives one service instance; returns its idle memory."""
    plan = runner.plan
    with serving(runner, label, repository) as service:
        pids = service_pids(service)
        model = served_model(repository)
        idle = {name: round(rss_mib(*pid), 1) for name, pid in pids.items()}
        progress(f"{label} idle memory: {idle}")
        for protocol, encoding in plan.protocols if full_matrix else plan.protocols[:1]:
            port, build = endpoint(service, protocol)
            singles, hundreds = build(model, texts, 1, encoding), build(model, texts, 100, encoding)
            # c1 too: issue 26 judges the best CPU configuration's (int8's) lone-text latency.
            for concurrency in plan.concurrencies if full_matrix else sorted({1, plan.headline_concurrency}):
                runner.measure(label, port, protocol, encoding, "sentences", singles, 1, concurrency, pids, service)
            runner.measure(label, port, protocol, encoding, "sentences", hundreds, 100, plan.batch_concurrency, pids, service)
        if full_matrix:
            port = service.http_port
            runner.measure(
                label,
                port,
                "http",
                "float",
                "passages",
                requests.openai_bodies(model, passages, 1, "float"),
                1,
                plan.headline_concurrency,
                pids,
                service,
            )
            many = plan.passages_per_request
            runner.measure(
                label,
                port,
                "http",
                "float",
                "passages",
                requests.openai_bodies(model, passages, many, "float"),
                many,
                plan.batch_concurrency,
                pids,
                service,
            )
            # The same sentences over /semantic_embed, without and with an attention control on a content word.
            words = content_word_cases(texts)
            for encoding, factor in (("semantic_embed", None), ("semantic_embed controlled", 0.0)):
                runner.measure(
                    label,
                    port,
                    "http",
                    encoding,
                    "sentences",
                    requests.semantic_bodies(model, words, factor),
                    1,
                    plan.headline_concurrency,
                    pids,
                    service,
                    target=requests.SEMANTIC_EMBED,
                )
            # Repeated queries without a cache: what run_cache's figure is compared with.
            runner.measure(
                label,
                port,
                "http",
                "float zipf",
                "sentences",
                zipf_bodies(model, texts),
                1,
                plan.headline_concurrency,
                pids,
                service,
            )
        quality = _sts_quality(service, model)
        progress(f"{label} STS Spearman {quality:.4f}")
        return {"idle_memory_mib": idle, "sts_spearman": quality}


ZIPF_EXPONENT = 1.1
ZIPF_DRAWS = 50_000


def zipf_bodies(model: str, texts: list[str]) -> list[bytes]:
    return requests.openai_bodies(model, workload.zipf_queries(texts, ZIPF_DRAWS, ZIPF_EXPONENT), 1, "float")


def _cache_counts(service: RunningService) -> dict[str, float]:
    """The gateway's embed_gateway_cache_texts_total by result."""
    with urllib.request.urlopen(f"{service.http_url}/metrics", timeout=10) as response:
        families = text_string_to_metric_families(response.read().decode())
        return {
            s.labels["result"]: s.value
            for f in families
            if f.name == "embed_gateway_cache_texts"
            for s in f.samples
            if s.name.endswith("_total")
        }


def run_cache(runner: Runner, repository: Path, texts: list[str]) -> dict:
    """Repeated queries (single texts drawn with a Zipf law from the sentences) through a service with the Redis
    embedding cache on, from a cold cache; the same bodies without it are measured in run_service."""
    with RedisServer() as redis, serving(runner, CACHE_LABEL, repository, [f"--cache-url={redis.url}"]) as service:
        pids = service_pids(service)
        before = _cache_counts(service)
        runner.measure(
            CACHE_LABEL,
            service.http_port,
            "http",
            "float zipf",
            "sentences",
            zipf_bodies(served_model(repository), texts),
            1,
            runner.plan.headline_concurrency,
            pids,
            service,
        )
        after = _cache_counts(service)
    hits, misses = (after.get(r, 0) - before.get(r, 0) for r in ("hit", "miss"))
    progress(f"cache hit rate over the run (warm-up included, cold at the start): {hits / max(hits + misses, 1):.1%}")
    return {
        "zipf_exponent": ZIPF_EXPONENT,
        "distinct_texts": len(texts),
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / max(hits + misses, 1),
    }


def run_pipeline_ceiling(runner: Runner, repository: Path, texts: list[str]) -> None:
    """Single texts through the service on the zero-encoder copy of `repository` (bench.pipeline_ceiling)."""
    label = pipeline_ceiling.LABEL
    variant = pipeline_ceiling.build(repository, runner.work / "pipeline-ceiling-repository")
    with serving(runner, label, variant) as service:
        pids = service_pids(service)
        model = served_model(variant)
        for protocol, encoding, concurrency in runner.plan.ceiling_points:
            port, build = endpoint(service, protocol)
            runner.measure(
                label, port, protocol, encoding, "sentences", build(model, texts, 1, encoding), 1, concurrency, pids, service
            )


def _sts_quality(service: RunningService, model: str) -> float:
    from aleph_alpha_client import Client

    texts, gold = _sts_pairs()
    vectors, _ = served(Client(token="unused", host=service.http_url), model, texts, None)
    return spearman(pair_cosines(vectors), gold)


def _peer_sts_quality(url: str) -> float:
    texts, gold = _sts_pairs()
    vectors = []
    for start in range(0, len(texts), 100):
        body = json.dumps({"model": infinity_peer.SERVED_NAME, "input": texts[start : start + 100]}).encode()
        call = urllib.request.Request(url + infinity_peer.PATH, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(call, timeout=120) as response:
            vectors += [item["embedding"] for item in json.load(response)["data"]]
    return spearman(pair_cosines(np.array(vectors, dtype=np.float32)), gold)


def run_peer(runner: Runner, model_dir: Path, texts: list[str]) -> dict:
    plan = runner.plan
    python = infinity_peer.ensure_installed(ROOT, progress)
    (port,) = free_ports(1)
    progress("starting infinity-emb (torch engine, CPU)")
    process = infinity_peer.start_infinity(python, model_dir, port, runner.work / "infinity.log")
    try:
        infinity_peer.wait_ready(f"http://127.0.0.1:{port}", process, timeout_s=300)
        pids = {"infinity": (process.pid, True)}
        idle = {"infinity": round(rss_mib(process.pid, True), 1)}
        name = infinity_peer.SERVED_NAME
        singles, hundreds = requests.openai_bodies(name, texts, 1, "float"), requests.openai_bodies(name, texts, 100, "float")
        for concurrency in plan.concurrencies:
            runner.measure(
                "infinity-emb", port, "http", "float", "sentences", singles, 1, concurrency, pids, target=infinity_peer.PATH
            )
        runner.measure(
            "infinity-emb",
            port,
            "http",
            "float",
            "sentences",
            hundreds,
            100,
            plan.batch_concurrency,
            pids,
            target=infinity_peer.PATH,
        )
        quality = _peer_sts_quality(f"http://127.0.0.1:{port}")
        progress(f"infinity-emb STS Spearman {quality:.4f}")
        return {"idle_memory_mib": idle, "version": infinity_peer.VERSION, "sts_spearman": quality}
    finally:
        infinity_peer.stop(process)


def raw_baseline(repository: Path, texts: list[str], passages: list[str], plan: Plan, threads: int) -> dict:
    encoder = RawEncoder(repository, threads)
    sentence_runs = encoder.best_throughput(texts, plan.raw_batch_sizes, progress)
    passage_runs = encoder.best_throughput(passages, [s for s in plan.raw_batch_sizes if 8 <= s <= 32] or [8], progress)
    single = encoder.single_latency_ms(texts, min(200, len(texts)))
    progress(f"raw onnxruntime {encoder.precision} single text p50 {single:.2f} ms")
    quality = _raw_sts_quality(encoder)
    progress(f"raw onnxruntime {encoder.precision} STS Spearman {quality:.4f}")
    return {
        "precision": encoder.precision,
        "sentences": {r.batch_size: r.texts_per_s for r in sentence_runs},
        "passages": {r.batch_size: r.texts_per_s for r in passage_runs},
        "single_p50_ms": single,
        "sts_spearman": quality,
    }


def _sts_pairs() -> tuple[list[str], np.ndarray]:
    """The STS pairs' texts (first, second, first, ...) and gold scores."""
    pairs = read_sts_pairs()
    return [t for p in pairs for t in (p.first, p.second)], np.array([p.score for p in pairs])


def _raw_sts_quality(encoder: RawEncoder) -> float:
    # In batches: neither served precision gives a text a vector that depends on its batch (tests/test_determinism_e2e.py).
    texts, gold = _sts_pairs()
    return spearman(pair_cosines(np.concatenate([encoder.embed(texts[i : i + 32]) for i in range(0, len(texts), 32)])), gold)


def export_int8(work: Path) -> Path:
    target = work / "int8_repository"
    progress("exporting the int8 model (reused when unchanged)")
    subprocess.run([sys.executable, "-m", "export", "--precision", "int8", "--output-dir", str(target)], cwd=ROOT, check=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny durations and fewer points, to prove the suite runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for throughput.md, .json and .png")
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository", help="the exported fp32 repository")
    parser.add_argument(
        "--work-dir", type=Path, default=ROOT / ".bench", help="logs of the servers it starts, and the int8 export"
    )
    parser.add_argument("--no-peer", action="store_true", help="leave infinity-emb out")
    parser.add_argument("--no-int8", action="store_true", help="leave the int8 export out")
    args = parser.parse_args(argv)
    plan = Plan.smoke() if args.smoke else Plan.full()
    work = fresh_work_dir(args.work_dir, "run-")

    texts = workload.sentences()[: plan.raw_texts]
    passages = workload.passages()
    threads = len(os.sched_getaffinity(0))
    results: dict = {
        "command": command_line("bin/bench", argv),
        "plan": asdict(plan),
        "machine": describe(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    progress(f"machine: {results['machine']['cores (usable)']} cores, {results['machine']['CPU']}")
    runner = Runner(plan, work)

    results["raw"] = {"fp32": raw_baseline(args.repository, texts, passages, plan, threads)}
    results["service"] = {"fp32": run_service(runner, "service", args.repository, texts, passages, full_matrix=True)}
    results["cache"] = run_cache(runner, args.repository, texts)
    run_pipeline_ceiling(runner, args.repository, texts)
    if not args.no_peer:
        results["peer"] = run_peer(runner, default_model_path(), texts)
    if not args.no_int8:
        int8 = export_int8(args.work_dir)
        results["raw"]["int8"] = raw_baseline(int8, texts, passages, plan, threads)
        results["service"]["int8"] = run_service(runner, "service int8", int8, texts, passages, full_matrix=False)
    # The machine's speed drifts (shared hosts); the same raw figure again at the end shows by how much.
    results["raw_fp32_batch32_at_end"] = RawEncoder(args.repository, threads).throughput(texts, 32).texts_per_s
    progress(f"raw onnxruntime fp32 batch 32 at the end: {results['raw_fp32_batch32_at_end']:.0f} texts/s")
    results["measurements"] = [asdict(m) for m in runner.measurements]
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    paths = write_report(results, args.out)
    progress("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())

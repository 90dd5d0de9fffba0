"""The benchmarks' smoke runs: every step of `bin/bench`, `bench.auth_overhead`, `bench.perf_analyzer.study`, `bench.images`,
`bench.cpu_runtimes`, `bench.single_text_path` and `bench.idle_cost` for a few seconds, so they cannot rot.

Each starts its own gateway and Triton (bin/bench also the pipeline-ceiling, peer and int8 servers), measures raw onnxruntime, drives
the load generator in its own process, and writes the report; the figures are too short-lived to judge, so
this checks that each is there and sane, not how fast anything is.
"""

import json
import subprocess
import sys

import pytest

from bench.pipeline_ceiling import LABEL as CEILING
from bench.report import CACHE_LABEL, find_measurement
from harness.servers import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


# Every step of bin/bench, infinity-emb's first install and an int8 export included: about 100 s on an AVX-512 machine,
# 10 minutes on a slower AVX2 one, past the suite's default 600 s.
@pytest.mark.timeout(1500)
def test_smoke_run_writes_every_part_of_the_report(tmp_path):
    out = tmp_path / "results"
    subprocess.run([sys.executable, "-m", "bench.throughput", "--smoke", "--out", str(out)], cwd=ROOT, check=True, timeout=1500)

    results = json.loads((out / "throughput.json").read_text())
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "throughput.md").read_text()

    raw = results["raw"]
    assert set(raw) == {"fp32", "int8"}
    assert all(rate > 0 for figures in raw.values() for rate in figures["sentences"].values())
    assert all(figures["single_p50_ms"] > 0 for figures in raw.values())

    servers = {m["server"] for m in results["measurements"]}
    assert servers == {"service", CEILING, "infinity-emb", "service int8", CACHE_LABEL}
    protocols = {(m["protocol"], m["encoding"]) for m in results["measurements"] if m["server"] == "service"}
    assert protocols == {
        ("http", "float"),
        ("grpc", "float"),
        ("http", "semantic_embed"),
        ("http", "semantic_embed controlled"),
        ("http", "float zipf"),
    }
    # Repeated queries: most are answered by the cache even from cold in a few seconds, and the report compares.
    assert results["cache"]["hit_rate"] > 0.5 and results["cache"]["misses"] > 0, results["cache"]
    off, on, ratio = _cells(report, "cache off")[0], _cells(report, "cache on")[0], _cells(report, "on / off")[0]
    # The ratio is of the exact texts/s, which are printed rounded to whole numbers (and it to two decimals).
    on, off = float(on), float(off)
    assert (on - 0.5) / (off + 0.5) - 0.005 <= float(ratio) <= (on + 0.5) / (off - 0.5) + 0.005, (on, off, ratio)
    ceiling = [m for m in results["measurements"] if m["server"] == CEILING]
    assert {(m["protocol"], m["encoding"], m["concurrency"]) for m in ceiling} == {
        tuple(p) for p in results["plan"]["ceiling_points"]
    }
    assert all(m["texts_per_request"] == 1 and m["encoder_batch"] >= 1 for m in ceiling), ceiling
    for m in results["measurements"]:
        assert m["errors"] == 0, m
        assert m["texts_per_s"] > 0 and m["p50_ms"] <= m["p99_ms"], m
        # CPU time is counted in 10 ms ticks: a run of a few 100-text requests can read 0.
        assert 0 <= m["loadgen_cpu_share"] < 2, m
        assert all(mib > 0 for mib in m["memory_mib"].values()), m
    assert any(m["loadgen_cpu_share"] > 0 for m in results["measurements"])
    service_runs = [m for m in results["measurements"] if m["server"] != "infinity-emb"]
    # Controlled prompts are tokenized by the gateway and enter Triton at the controlled-ids step.
    controlled = [m for m in service_runs if m["encoding"] == "semantic_embed controlled"]
    assert all({"gateway", "tritonserver", "controlled-ids", "encoder", "pooling"} <= set(m["cpu_share"]) for m in controlled)
    assert all(
        {"gateway", "tritonserver", "tokenizer", "encoder", "pooling"} <= set(m["cpu_share"])
        for m in service_runs
        if m not in controlled
    )
    # The zero encoder does no encoding: a small part of what the real one costs at the same point.
    for m in ceiling:
        real = find_measurement(results, "service", m["protocol"], m["encoding"], "sentences", 1, m["concurrency"])
        assert m["cpu_share"]["encoder"] < real["cpu_share"]["encoder"] / 2, (m, real)

    for quality in [*results["service"].values(), *raw.values(), results["peer"]]:
        assert 0.7 < quality["sts_spearman"] < 0.8
    # The ladder: raw fp32 (the yardstick, ratio 1.00, no drop), raw int8, both services and the peer, each with
    # its STS Spearman beside it.
    rungs = ("raw onnxruntime fp32", "raw onnxruntime int8", "service", "service int8", "infinity-emb")
    ladder = {row: _cells(report, f"{rung}. {row}") for rung, row in enumerate(rungs, 1)}
    assert ladder["raw onnxruntime fp32"][1] == "1.00" and ladder["raw onnxruntime fp32"][-1] == "0.00%", ladder
    for row, cells in ladder.items():
        assert 0.7 < float(cells[-2]) < 0.8, (row, cells)
    # Every target has a verdict in the table, met or missed by how much.
    target_rows = report.split("## Targets", 1)[1].strip().splitlines()[2:]
    assert len(target_rows) >= 6
    # Issue 26's: the best CPU configuration (int8) against raw fp32, on batches, single texts and one text's latency.
    assert sum(row.startswith("| service int8, ") for row in target_rows) == 3, target_rows
    assert all(row.rstrip(" |").endswith("met") or "missed by" in row for row in target_rows)
    assert sum(row.startswith(f"| {CEILING}, ") for row in target_rows) == 2  # requests/s at its top concurrency, c1 p50
    # Its rows in the service and CPU tables.
    assert sum(line.startswith(f"| {CEILING} |") for line in report.splitlines()) == 2 * len(ceiling)


def _cells(report: str, first_cell: str) -> list[str]:
    """The cells after the first of each markdown table row whose first cell is first_cell."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in report.splitlines() if line.startswith("|")]
    return [cell for row in rows if row[0] == first_cell for cell in row[1:]]


def test_auth_overhead_smoke_run_reports_the_on_off_ratio_with_no_failed_request(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "-m", "bench.auth_overhead", "--smoke", "--out", str(out), "--work-dir", str(tmp_path / "work")]
    subprocess.run(command, cwd=ROOT, check=True, timeout=300)

    report = (out / "auth_overhead.md").read_text()
    off, on, ratio = (float(cell) for cell in _cells(report, "texts/s, median of rounds"))
    assert off > 0 and on > 0
    assert abs(ratio - on / off) < 0.03  # the texts/s it is computed from are printed rounded
    assert _cells(report, "failed requests")[:2] == ["0", "0"]


def test_perf_analyzer_study_smoke_run_measures_both_tools_on_every_route(tmp_path):
    from bench.perf_analyzer.study import ROUTES

    out = tmp_path / "results"
    command = [
        sys.executable,
        "-m",
        "bench.perf_analyzer.study",
        "--smoke",
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path / "work"),
    ]
    subprocess.run(command, cwd=ROOT, check=True, timeout=600)

    results = json.loads((out / "perf_analyzer.json").read_text())
    assert all(rate > 0 for rate in results["raw"].values())
    points = {(p["route"], p["tool"], p["concurrency"]): p for p in results["points"]}
    assert set(points) == {
        (r, t, c) for r in ROUTES for t in ("perf_analyzer", "loadgen") for c in results["plan"]["concurrencies"]
    }
    for point in points.values():
        # perf_analyzer stops at the first response that differs from the one recorded for it alone.
        assert point["errors"] is None, point
        assert point["requests_per_s"] > 0 and 0 < point["p50_ms"] <= point["p99_ms"], point
    report = (out / "perf_analyzer.md").read_text()
    for route in ROUTES:
        rows = [
            line
            for line in report.split(f"## {route}\n", 1)[1].split("\n## ", 1)[0].splitlines()
            if line.startswith("| ") and line[2].isdigit()
        ]
        assert [row.split("|")[1].strip() for row in rows] == [str(c) for c in results["plan"]["concurrencies"]], route


def test_images_smoke_run_sets_every_service_point_against_raw_onnxruntime(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "-m", "bench.images", "--smoke", "--out", str(out), "--work-dir", str(tmp_path / "work")]
    subprocess.run(command, cwd=ROOT, check=True, timeout=600)

    run = json.loads((out / "images.json").read_text())
    assert run["least_cosine"] >= 0.9999  # the service answered raw onnxruntime's vectors before the load
    for raw in [*run["raw"], run["raw_best_at_end"]]:
        assert raw["images_per_s"] > 0 and 0 < raw["p50_ms"] <= raw["p99_ms"], raw
        assert raw["preprocess_ms_per_image"] > 0 and raw["encode_ms_per_image"] > 0, raw
    measurements = run["measurements"]
    assert {(m["encoding"], m["texts_per_request"]) for m in measurements} == {
        ("semantic_embed", 1),
        ("batch_semantic_embed", 16),
    }
    for m in measurements:
        assert m["errors"] == 0, m
        assert m["texts_per_s"] > 0 and 0 < m["p50_ms"] <= m["p99_ms"], m
        assert {"gateway", "tritonserver", "encoder"} <= set(m["cpu_share"]), m
        assert m["encoder_batch"] >= 1, m

    report = (out / "images.md").read_text()
    result = report.split("## Result", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in result.splitlines() if line.startswith("| ")]
    assert rows[0][:5] == ["service point", "raw counterpart", "raw images/s", "service images/s", "ratio"], rows[0]
    assert [row[0] for row in rows[1:]] == [
        f"one image per /semantic_embed request, c{m['concurrency']}"
        if m["texts_per_request"] == 1
        else f"{m['texts_per_request']} images per /batch_semantic_embed request, c{m['concurrency']}"
        for m in measurements
    ]
    assert rows[1][1] == "one image at a time"
    for row in rows[1:]:
        raw, served, ratio = float(row[2]), float(row[3]), float(row[4])
        assert raw > 0 and served > 0, row
        # The ratio is of the exact images/s, which are printed rounded to whole numbers (and it to two decimals).
        assert (served - 0.5) / (raw + 0.5) - 0.005 <= ratio <= (served + 0.5) / (raw - 0.5) + 0.005, row


def test_cpu_runtimes_smoke_run_reports_every_configuration(tmp_path):
    from bench.cpu_runtimes import main

    out = tmp_path / "cpu_runtimes.md"
    assert main(["--rounds", "1", "--pairs", "40", "--out", str(out), "--work-dir", str(tmp_path / "work")]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "configuration" not in line]
    assert len(rows) == 11, rows
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) > 0 and float(cells[4]) > 0, cells
        # Every configuration but the per-run int8 in slices gives a text the same vector alone and batched.
        assert (float(cells[8]) > 1e-3) == ("a scale per run, slices of 8" in cells[0]), cells
    assert rows[0].split("|")[4].strip() == "1.00"  # fp32 is the yardstick


def test_single_text_path_smoke_run_splits_the_time_by_step(tmp_path):
    from bench.single_text_path import PATHS, main

    out = tmp_path / "single_text_path.md"
    assert main(["--requests", "20", "--no-int8", "--out", str(out), "--work-dir", str(tmp_path / "work")]) == 0
    report = out.read_text()
    assert all(float(cell.removesuffix(" ms")) > 0 for cell in _cells(report, "fp32")[: len(PATHS)])
    steps = {
        row[1]: row for row in ([c.strip() for c in line.strip("|").split("|")] for line in report.splitlines()) if len(row) == 8
    }
    for step in ("ensemble", "tokenizer", "encoder", "pooling"):
        # 20 texts and the one untimed first call, each its own execution of every step.
        assert steps[step][2] == "21" and float(steps[step][7]) > 0, steps[step]


def test_idle_cost_smoke_run_measures_both_checkouts_while_idle_and_per_request(tmp_path):
    from bench.idle_cost import main

    out = tmp_path / "idle_cost.md"
    # This checkout as its own baseline: both rows' code path, in two services started one after the other.
    arguments = ["--baseline-root", str(ROOT), "--rounds", "1", "--requests", "10", "--idle-s", "1"]
    assert main([*arguments, "--out", str(out), "--work-dir", str(tmp_path / "work")]) == 0
    report = out.read_text()
    for checkout in (f"baseline ({ROOT.name})", "this checkout"):
        p50, gateway, _triton, _tokenizer, encoder, *_ = (float(cell) for cell in _cells(report, checkout))
        # Ten requests cannot take no time, nor pass the gateway and the encoder without their CPU.
        assert p50 > 0 and gateway > 0 and encoder > 0, report

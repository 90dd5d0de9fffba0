"""What authentication costs: throughput of single-text requests at concurrency 32 with --auth off and on.

    .venv/bin/python -m bench.auth_overhead                 # about 5 minutes; writes bench/results/auth_overhead.md
    .venv/bin/python -m bench.auth_overhead --smoke --out DIR   # seconds per step, one round: proves it runs

The goal it checks: throughput with authentication on is at least 95% of throughput with it off. Measured in one run:
1. raw onnxruntime at batch 32 on the same sentences, the ceiling that bin/bench divides its c32 single-text point by;
2. the service under the throughput suite's closed-loop load generator: 32 callers, each with one single-text
   POST /v1/embeddings (openai body, float) in flight, for the suite's warm-up and measured window. "Off" is the
   gateway as bin/bench starts it; "on" is the gateway with --auth and a client token created by the admin CLI in
   the run dir's SQLite store, sent as `Authorization: Bearer ...` on every request.
   The modes alternate over several rounds, off first in odd rounds and on first in even ones, because this VM's
   speed drifts by up to about 15% within minutes: alternation puts the drift into both modes alike, and swapping
   the order cancels a steady drift within each pair. Every measurement gets a fresh service that is stopped
   after it, so only one gateway and one Triton exist at a time (an idle second one takes about 2% of a core);
3. raw onnxruntime again at the end, to show how far the machine drifted during the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from bench import requests, workload
from bench.cli import command_line, fresh_work_dir
from bench.machine import describe
from bench.raw_onnxruntime import RawEncoder
from bench.report import find_measurement
from bench.report import markdown_table as table
from bench.throughput import RESULTS, Measurement, Plan, Runner, progress, service_pids
from harness.servers import MODEL_REPOSITORY, ROOT, RunningService, gateway_cli, start_service

CONCURRENCY = 32
RAW_BATCH = 32  # bin/bench judges its single-text points at c32 and above against raw onnxruntime at this batch
GOAL = 0.95
MODES = ("off", "on")
USER = "bench@example.com"


class Interrupts:
    """SIGTERM and Ctrl-C end the run with SystemExit, so every service is stopped on the way out; while one is being
    stopped they wait for that to finish, since an exit in the middle of it would leave its processes behind."""

    def __init__(self) -> None:
        self.deferring = False
        self.pending: int | None = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if self.deferring:
            self.pending = signum
        else:
            sys.exit(128 + signum)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None:
            sys.exit(128 + self.pending)


@contextlib.contextmanager
def running(run_dir: Path, repository: Path, extra_args: list[str], interrupts: Interrupts, root: Path = ROOT):
    """A started service (the gateway of checkout `root`), stopped on the way out whatever happens, including an
    interrupted start."""
    try:
        service = start_service(run_dir, repository, extra_args, root=root)
    except BaseException:
        with interrupts.deferred():
            _stop_unreturned(run_dir)
        raise
    try:
        yield service
    finally:
        with interrupts.deferred():
            service.stop()


def _stop_unreturned(run_dir: Path) -> None:
    """A start interrupted (SIGTERM, Ctrl-C) before start_service returned leaves a gateway that no one holds: found
    among this process's children by its --run-dir, and stopped the way RunningService.stop does it."""
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if f"--run-dir={run_dir}" in child.cmdline():
                child.terminate()  # the gateway stops its Triton on SIGTERM and removes triton.pid
                try:
                    child.wait(60)
                except psutil.TimeoutExpired:
                    child.kill()
    pid_file = run_dir / "triton.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def _check_auth_is_on(service: RunningService, body: bytes) -> None:
    """The "on" figures mean something only if a request without a token is refused."""
    request = urllib.request.Request(f"{service.http_url}/v1/embeddings", body, {"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=30).close()
    except urllib.error.HTTPError as error:
        if error.code == 401:
            return
        raise
    raise RuntimeError("the gateway started with --auth served a request without a token")


def raw_batch32(repository: Path, texts: list[str], label: str) -> float:
    encoder = RawEncoder(repository, len(os.sched_getaffinity(0)))
    return encoder.best_throughput(texts, [RAW_BATCH], lambda line: progress(f"{label}: {line}"))[0].texts_per_s


def other_cpu(m: Measurement) -> float:
    """Share of one core busy outside the service and the load generator: other processes on the machine. Rough: the
    service's share covers the load generator's start-up and warm-up, the load generator's only its window."""
    busy = (1 - m.machine_idle - m.machine_steal) * len(os.sched_getaffinity(0))
    return busy - sum(m.cpu_share.values()) - m.loadgen_cpu_share


def gateway_ms_per_request(cpu_share: dict[str, float], texts_per_s: float) -> float:
    """The gateway's CPU time per single-text request: authentication is paid there, so its cost shows there first.
    The CPU share spans the load generator's start-up and warm-up too, so this reads a
    few % low, as it does for bin/bench's figures, which are counted the same way."""
    return 1000 * cpu_share.get("gateway", 0.0) / texts_per_s if texts_per_s else float("nan")


def measure_rounds(
    runner: Runner, repository: Path, bodies: list[bytes], rounds: int, interrupts: Interrupts
) -> list[tuple[int, str, Measurement]]:
    work = runner.work
    gateway_cli("users", "add", USER, "--role", "client", f"--run-dir={work / 'on'}")
    token = gateway_cli("tokens", "create", "--user", USER, "--description", "bench.auth_overhead", f"--run-dir={work / 'on'}")
    token = token.strip()
    extra_args = {"off": [], "on": ["--auth"]}
    headers = {"off": None, "on": {"Authorization": f"Bearer {token}"}}
    results = []
    for round_number in range(1, rounds + 1):
        for mode in MODES if round_number % 2 else MODES[::-1]:
            progress(f"round {round_number}/{rounds}: starting the service with auth {mode}")
            with running(work / mode, repository, extra_args[mode], interrupts) as service:
                if mode == "on":
                    _check_auth_is_on(service, bodies[0])
                m = runner.measure(
                    f"auth {mode}",
                    service.http_port,
                    "http",
                    "float",
                    "sentences",
                    bodies,
                    1,
                    CONCURRENCY,
                    service_pids(service),
                    service,
                    headers=headers[mode],
                )
            results.append((round_number, mode, m))
    return results


def summarize(rounds: list[tuple[int, str, Measurement]], raw: float) -> dict:
    by_mode = {mode: [m for _, each, m in rounds if each == mode] for mode in MODES}
    summary = {
        mode: {
            "texts_per_s": statistics.median(m.texts_per_s for m in ms),
            "p50_ms": statistics.median(m.p50_ms for m in ms),
            "p99_ms": statistics.median(m.p99_ms for m in ms),
            "gateway_ms": statistics.median(gateway_ms_per_request(m.cpu_share, m.texts_per_s) for m in ms),
            "errors": sum(m.errors for m in ms),
        }
        for mode, ms in by_mode.items()
    }
    for figures in summary.values():
        figures["ratio_to_raw"] = figures["texts_per_s"] / raw
    summary["ratio"] = summary["on"]["texts_per_s"] / summary["off"]["texts_per_s"]
    pairs = {}
    for number, mode, m in rounds:
        pairs.setdefault(number, {})[mode] = m.texts_per_s
    summary["round_ratios"] = {n: p["on"] / p["off"] for n, p in pairs.items()}
    summary["median_round_ratio"] = statistics.median(summary["round_ratios"].values())
    return summary


def committed_reference() -> dict | None:
    """bin/bench's committed c32 single-text HTTP float point: the same load on the service as it was then."""
    path = RESULTS / "throughput.json"
    if not path.exists():
        return None
    committed = json.loads(path.read_text())
    m = find_measurement(committed, "service", "http", "float", "sentences", 1, CONCURRENCY)
    raw = committed["raw"]["fp32"]["sentences"].get(str(RAW_BATCH))
    if m is None or raw is None:
        return None
    figures = {key: m[key] for key in ("texts_per_s", "p50_ms", "p99_ms")}
    gateway_ms = gateway_ms_per_request(m.get("cpu_share", {}), m["texts_per_s"])
    return {"started": committed["started"], "raw": raw, "gateway_ms": gateway_ms, **figures}


def markdown(run: dict) -> str:
    s, raw = run["summary"], run["raw_start"]
    verdict = "met" if s["ratio"] >= GOAL else f"missed by {100 * (1 - s['ratio'] / GOAL):.1f}%"
    lines = [
        "# Authentication overhead: single-text requests at concurrency 32, --auth off and on",
        "",
        f"Made by `{run['command']}` from {run['started']} to {run['finished']} ({run['wall_s']:.0f} s); every figure below is "
        "from that one run.",
        f"Load: the throughput suite's load generator, {CONCURRENCY} callers on keep-alive connections, each with one "
        f"single-text POST /v1/embeddings (openai body, float) in flight, cycling through the {run['texts']} STS sentences; "
        f"{run['warmup_s']:g} s warm-up, {run['duration_s']:g} s measured. Auth on: `--auth`, a client token made by "
        "`python -m gateway tokens create` in the run dir's SQLite store, `Authorization: Bearer` on every request "
        "(checked: the same service refuses a request without it with 401).",
        f"{run['rounds']} round{'s' if run['rounds'] != 1 else ''}; off runs first in odd rounds and second in even ones. "
        "Each measurement starts a fresh gateway and Triton and stops them after it, so only one of each runs at a time.",
        "",
        "## Result",
        "",
        *table(
            ["", "auth off", "auth on", "on / off"],
            [
                [
                    "texts/s, median of rounds",
                    f"{s['off']['texts_per_s']:.0f}",
                    f"{s['on']['texts_per_s']:.0f}",
                    f"{s['ratio']:.3f}",
                ],
                [
                    "p50 ms, median of rounds",
                    f"{s['off']['p50_ms']:.1f}",
                    f"{s['on']['p50_ms']:.1f}",
                    f"{s['on']['p50_ms'] / s['off']['p50_ms']:.3f}",
                ],
                [
                    "p99 ms, median of rounds",
                    f"{s['off']['p99_ms']:.1f}",
                    f"{s['on']['p99_ms']:.1f}",
                    f"{s['on']['p99_ms'] / s['off']['p99_ms']:.3f}",
                ],
                [
                    "gateway CPU ms per request, median of rounds",
                    f"{s['off']['gateway_ms']:.2f}",
                    f"{s['on']['gateway_ms']:.2f}",
                    f"{s['on']['gateway_ms'] / s['off']['gateway_ms']:.3f}",
                ],
                [
                    f"ratio to raw onnxruntime batch {RAW_BATCH} ({raw:.0f} texts/s)",
                    f"{s['off']['ratio_to_raw']:.2f}",
                    f"{s['on']['ratio_to_raw']:.2f}",
                    "",
                ],
                ["failed requests", s["off"]["errors"], s["on"]["errors"], ""],
            ],
        ),
        "",
        f"Goal: throughput with auth on >= {GOAL:.2f} of off at c{CONCURRENCY}. Measured (ratio of the medians): "
        f"{s['ratio']:.3f}, {verdict}. The on/off ratio within each round: "
        + ", ".join(f"{r:.3f}" for r in s["round_ratios"].values())
        + f" (median {s['median_round_ratio']:.3f}).",
        "",
        "## Rounds",
        "",
        "Encoder batch: Triton's inferences per encoder execution. CPU columns are shares of one core over the "
        'measurement; "others" is what the machine spent beyond the service and the load generator (other processes; '
        "rough, a few % of it is the load generator's start-up).",
        "",
    ]
    rows = [
        [
            n,
            mode,
            f"{m.texts_per_s:.0f}",
            f"{m.texts_per_s / raw:.2f}",
            f"{m.p50_ms:.1f}",
            f"{m.p99_ms:.1f}",
            f"{m.encoder_batch:.1f}" if m.encoder_batch else "-",
            f"{100 * m.cpu_share.get('gateway', 0):.0f}%",
            f"{gateway_ms_per_request(m.cpu_share, m.texts_per_s):.2f}",
            f"{100 * (sum(m.cpu_share.values()) - m.cpu_share.get('gateway', 0)):.0f}%",
            f"{100 * m.loadgen_cpu_share:.0f}%",
            f"{100 * other_cpu(m):.0f}%",
            f"{100 * m.machine_idle:.0f}%",
            f"{100 * m.machine_steal:.0f}%",
            m.errors,
        ]
        for n, mode, m in run["rounds_measured"]
    ]
    header = [
        "round",
        "auth",
        "texts/s",
        "ratio to raw",
        "p50 ms",
        "p99 ms",
        "encoder batch",
        "gateway CPU",
        "gateway ms/request",
        "Triton + stubs CPU",
        "load generator CPU",
        "others",
        "machine idle",
        "steal",
        "failed",
    ]
    lines += table(header, rows)
    lines += [
        "",
        "## Raw onnxruntime (in-process, same encoder and tokenizer, sorted by length, batch 32)",
        "",
        f"At the start: {raw:.0f} texts/s (every ratio above is to this figure). At the end: {run['raw_end']:.0f} texts/s "
        f"({run['raw_end'] / raw - 1:+.1%}): how much the machine drifted during the run.",
    ]
    reference = run["reference"]
    if reference:
        off = s["off"]
        lines += [
            "",
            "## Against the committed throughput run",
            "",
            f"The same load in `bench/results/throughput.json` (bin/bench, started {reference['started']}; whatever the "
            f"gateway gained since is in the difference): {reference['texts_per_s']:.0f} texts/s, "
            f"{reference['texts_per_s'] / reference['raw']:.2f} of its raw batch 32 ({reference['raw']:.0f}), "
            f"p50 {reference['p50_ms']:.1f} ms, p99 {reference['p99_ms']:.1f} ms, gateway {reference['gateway_ms']:.2f} ms "
            f"of CPU per request. Auth off here: {off['texts_per_s']:.0f} texts/s, {off['ratio_to_raw']:.2f} of raw, "
            f"p50 {off['p50_ms']:.1f} ms, p99 {off['p99_ms']:.1f} ms, gateway {off['gateway_ms']:.2f} ms per request. "
            "Runs on this VM differ by up to about 15%, so only a difference well beyond that says something.",
        ]
    lines += ["", "## Machine", "", *table(["", ""], [[k, v] for k, v in run["machine"].items()])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.auth_overhead", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="one round of tiny measurements, written to --out or a temp dir")
    parser.add_argument(
        "--out", type=Path, help=f"directory for auth_overhead.md (default {RESULTS.relative_to(ROOT)}; a temp dir with --smoke)"
    )
    parser.add_argument("--rounds", type=int, help="off/on pairs (default 6; 1 with --smoke)")
    parser.add_argument("--repository", type=Path, default=MODEL_REPOSITORY, help="the exported fp32 repository")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".bench", help="run dirs and logs of the servers it starts")
    args = parser.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="auth-overhead-")) if args.smoke else RESULTS)
    if args.smoke and out.resolve() == RESULTS.resolve():
        parser.error(f"a smoke run's figures do not belong in {RESULTS}")
    interrupts = Interrupts()

    plan = Plan.smoke() if args.smoke else Plan.full()
    rounds = args.rounds or (1 if args.smoke else 6)
    work = fresh_work_dir(args.work_dir, "auth-")
    started, clock = time.strftime("%Y-%m-%d %H:%M:%S"), time.monotonic()
    machine = describe()
    progress(f"machine: {machine['cores (usable)']} cores, {machine['CPU']}; servers' logs in {work}")

    texts = workload.sentences()[: plan.raw_texts]
    raw_start = raw_batch32(args.repository, texts, "start")
    model = json.loads(next(args.repository.glob("*/embedding_manifest.json")).read_text())["name"]
    runner = Runner(plan, work)
    measured = measure_rounds(runner, args.repository, requests.openai_bodies(model, texts, 1, "float"), rounds, interrupts)
    raw_end = raw_batch32(args.repository, texts, "end")

    run = {
        "command": command_line(".venv/bin/python -m bench.auth_overhead", argv),
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_s": time.monotonic() - clock,
        "texts": len(texts),
        "warmup_s": plan.warmup_s,
        "duration_s": plan.duration_s,
        "rounds": rounds,
        "rounds_measured": measured,
        "raw_start": raw_start,
        "raw_end": raw_end,
        "summary": summarize(measured, raw_start),
        "reference": committed_reference(),
        "machine": machine,
    }
    text = markdown(run)
    print(text, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "auth_overhead.md").write_text(text)
    progress(f"wrote {out / 'auth_overhead.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A client looping ~4 MB /tokenize bodies, and what it does to everyone else's /v1/embeddings.

    .venv/bin/python -m bench.tokenize_flood [--base REV] [--rounds 3] [--seconds 5]

Starts the gateway (and its Triton) of this checkout on free ports, and with --base also that revision's (read with
`git archive`, nothing in the repository changes), one after the other on the same exported model repository. For
each, every round measures normal traffic twice, without and with the attacker, in alternating order so that a
machine that slows down during the run weighs on both alike:
- normal traffic: --clients closed-loop clients posting one STS sentence each to /v1/embeddings (bench.loadgen, in a
  process of its own, as it is in bin/bench);
- the attacker: one process that posts a /tokenize body of --attack-chars characters (about as many bytes, under the
  4 MiB body limit) on a keep-alive connection in a loop, sending the next as soon as the answer to the last is read.
The figure is normal traffic's rate with the attacker over its rate without: the median of the rounds' ratios (what
tests/test_tokenize_flood_e2e.py checks; the issue's goal is at least 0.80), and the ratio of the sums. Writes
bench/results/tokenize_flood.md with the command that made it.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson

from bench import machine, requests, workload
from bench.cli import command_line, fresh_work_dir, table_parser
from bench.throughput import run_load, served_model
from harness.servers import MODEL_REPOSITORY, ROOT, RunningService, start_service

ATTACK_CHARS = 4_000_000
CLIENTS = 4
# An attacker that has sent nothing within this long is broken, not slow.
ATTACK_START_TIMEOUT_S = 30
# How long the attacker's current request may run on once the measurement is over, before it is ended.
ATTACK_STOP_TIMEOUT_S = 15


def attack_body(model: str, chars: int = ATTACK_CHARS) -> bytes:
    """A /tokenize body whose prompt is real sentences repeated to `chars` characters, asking for tokens and ids."""
    text = " ".join(workload.sentences())
    prompt = (text * (chars // len(text) + 1))[:chars]
    return orjson.dumps({"model": model, "prompt": prompt, "tokens": True, "token_ids": True})


def _read_answer(sock: socket.socket, buffered: bytes) -> tuple[int, bytes]:
    """(status, bytes read past the answer) of one Content-Length-framed HTTP/1.1 answer."""
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    chunks, received = [rest], len(rest)
    while received < length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        chunks.append(chunk)
        received += len(chunk)
    data = b"".join(chunks)
    return int(head[9:12]), data[length:]


def _attack(port: int, body: bytes, stop, started, answers) -> None:
    """The attacker's process: posts `body` to /tokenize until `stop` is set; puts {status: count} on `answers`."""
    request = (
        f"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    counts: dict[str, int] = {}
    sock, buffered = None, b""
    began, cpu = time.perf_counter(), os.times()
    while not stop.is_set():
        try:
            if sock is None:
                sock, buffered = socket.create_connection(("127.0.0.1", port), timeout=60), b""
            sock.sendall(request)
            started.set()
            status, buffered = _read_answer(sock, buffered)
            counts[str(status)] = counts.get(str(status), 0) + 1
        except OSError as error:  # the server closed the connection: open another, as an attacker would
            counts[type(error).__name__] = counts.get(type(error).__name__, 0) + 1
            if sock is not None:
                sock.close()
            sock = None
    if sock is not None:
        sock.close()
    spent = os.times()
    answers.put((counts, (spent.user + spent.system - cpu.user - cpu.system) / (time.perf_counter() - began)))


@dataclass
class Phase:
    attacked: bool
    requests_per_s: float
    p99_ms: float
    errors: int
    attacker_answers: dict[str, int] = field(default_factory=dict)
    attacker_cores: float = 0.0  # CPU the attacker's own process took, in cores


def _normal_traffic(service: RunningService, bodies: list[bytes], clients: int, seconds: float, work: Path) -> dict:
    spec = {
        "protocol": "http",
        "port": service.http_port,
        "target": "/v1/embeddings",
        "bodies": bodies,
        "concurrency": clients,
        "warmup_s": 1.0,
        "duration_s": seconds,
        "max_requests": 10**7,
    }
    return run_load(spec, work)


def measure_phase(
    service: RunningService, bodies: list[bytes], attack: bytes | None, clients: int, seconds: float, work: Path
) -> Phase:
    """Normal traffic for `seconds` (after a second of warm-up), with the attacker looping `attack` throughout if given."""
    if attack is None:
        result = _normal_traffic(service, bodies, clients, seconds, work)
        return Phase(False, result["requests_per_s"], result["p99_ms"], result["errors"])
    context = multiprocessing.get_context("spawn")
    stop, started, answers = context.Event(), context.Event(), context.Queue()
    attacker = context.Process(target=_attack, args=(service.http_port, attack, stop, started, answers), daemon=True)
    attacker.start()
    try:
        if not started.wait(ATTACK_START_TIMEOUT_S):
            raise RuntimeError("the attacker sent nothing")
        result = _normal_traffic(service, bodies, clients, seconds, work)
        stop.set()
        counts, cores = answers.get(timeout=ATTACK_STOP_TIMEOUT_S)
    finally:
        stop.set()
        attacker.join(ATTACK_STOP_TIMEOUT_S)
        if attacker.is_alive():
            attacker.kill()
            attacker.join()
    return Phase(True, result["requests_per_s"], result["p99_ms"], result["errors"], counts, cores)


def measure(
    service: RunningService,
    rounds: int,
    seconds: float,
    work: Path,
    clients: int = CLIENTS,
    attack_chars: int = ATTACK_CHARS,
    label: str = "",
) -> list[Phase]:
    """`rounds` pairs of phases, without and with the attacker, the order alternating from round to round."""
    model = served_model(MODEL_REPOSITORY)
    bodies = requests.openai_bodies(model, workload.sentences(), 1, "float")
    attack = attack_body(model, attack_chars)
    phases = []
    for round_ in range(rounds):
        for attacked in (False, True) if round_ % 2 == 0 else (True, False):
            phase = measure_phase(service, bodies, attack if attacked else None, clients, seconds, work)
            print(
                f"[tokenize_flood]{label} round {round_ + 1} {'with' if attacked else 'without'} the attacker: "
                f"{phase.requests_per_s:.1f} req/s, p99 {phase.p99_ms:.0f} ms, {phase.errors} errors, "
                f"attacker's answers {phase.attacker_answers}, its process took {phase.attacker_cores:.2f} cores",
                flush=True,
            )
            phases.append(phase)
    return phases


def ratio(phases: list[Phase]) -> float:
    """Normal traffic's rate with the attacker over its rate without, over all rounds."""
    return sum(p.requests_per_s for p in phases if p.attacked) / sum(p.requests_per_s for p in phases if not p.attacked)


def round_ratios(phases: list[Phase]) -> list[float]:
    """The same ratio in each round, whose two phases ran back to back: load that others put on a shared machine
    for a while spoils one round, not the figure, when the median of these is taken."""
    rounds = [phases[i : i + 2] for i in range(0, len(phases), 2)]
    return [next(p for p in r if p.attacked).requests_per_s / next(p for p in r if not p.attacked).requests_per_s for r in rounds]


def _base_checkout(base: str, work: Path) -> Path:
    """`base` as files under work (git archive: the repository is only read), with this checkout's gRPC stubs."""
    tree = work / "base"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", base], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    for stub in (ROOT / "proto" / "embedding" / "v1").glob("embedding_pb2*.py*"):
        shutil.copy(stub, tree / "proto" / "embedding" / "v1" / stub.name)
    return tree


def _row(label: str, phases: list[Phase]) -> str:
    without = [p for p in phases if not p.attacked]
    with_ = [p for p in phases if p.attacked]
    answers: dict[str, int] = {}
    for p in with_:
        for status, count in p.attacker_answers.items():
            answers[status] = answers.get(status, 0) + count
    rounds = round_ratios(phases)
    return (
        f"| {label} | {', '.join(f'{p.requests_per_s:.1f}' for p in without)} "
        f"| {', '.join(f'{p.requests_per_s:.1f}' for p in with_)} "
        f"| {statistics.median(rounds):.2f} | {ratio(phases):.2f} (rounds: {', '.join(f'{r:.2f}' for r in rounds)}) "
        f"| {max(p.p99_ms for p in without):.0f} / {max(p.p99_ms for p in with_):.0f} "
        f"| {', '.join(f'{count} x {status}' for status, count in sorted(answers.items()))} in {len(with_)} phases |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = table_parser("bench.tokenize_flood", __doc__, "tokenize_flood.md")
    parser.add_argument("--base", help="also measure this git revision's gateway, for comparison")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per phase")
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--attack-chars", type=int, default=ATTACK_CHARS)
    args = parser.parse_args(argv)
    work = fresh_work_dir(args.work_dir, "tokenize-flood-")
    gateways = [("this checkout", ROOT)]
    if args.base:
        gateways.append((f"base ({args.base})", _base_checkout(args.base, work)))
    rows = []
    for index, (label, root) in enumerate(gateways):
        service = start_service(work / f"service-{index}", root=root)
        try:
            phases = measure(service, args.rounds, args.seconds, work, args.clients, args.attack_chars, f" {label}:")
        finally:
            service.stop()
        rows.append(_row(label, phases))
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    facts = machine.describe()
    lines = [
        "# A looping ~4 MB /tokenize and normal traffic",
        "",
        f"Made by `{command_line('.venv/bin/python -m bench.tokenize_flood', argv)}` on {when}, "
        f"{facts['cores (usable)']} cores ({facts['CPU']}), tokenizers {facts['tokenizers']}.",
        "",
        f"Normal traffic: {args.clients} closed-loop clients, one STS sentence per POST /v1/embeddings; each phase "
        f"{args.seconds:g} s measured after 1 s of warm-up. The attacker: one connection posting a /tokenize body of "
        f"{args.attack_chars} characters in a loop. Rounds alternate which phase comes first.",
        "",
        "| gateway | normal req/s without the attacker, per round | with it | with / without, median of the rounds "
        "(goal >= 0.80) | with / without, all rounds | normal p99 ms without / with | attacker's answers |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

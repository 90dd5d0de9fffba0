"""Writes a throughput run as markdown (tables and targets), JSON (every figure) and a PNG plot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Target:
    name: str
    measured: float
    required: float
    unit: str
    lower_is_better: bool = False

    @property
    def met(self) -> bool:
        return self.measured <= self.required if self.lower_is_better else self.measured >= self.required

    def verdict(self) -> str:
        if self.met:
            return "met"
        gap = (self.measured - self.required) / self.required if self.lower_is_better else 1 - self.measured / self.required
        return f"missed by {100 * gap:.0f}%"


def find_measurement(results: dict, server: str, protocol: str, encoding: str, corpus: str, per_request: int, concurrency: int | None = None):
    for m in results["measurements"]:
        if (m["server"], m["protocol"], m["encoding"], m["corpus"], m["texts_per_request"]) == (server, protocol, encoding, corpus, per_request):
            if concurrency is None or m["concurrency"] == concurrency:
                return m
    return None


def targets(results: dict) -> list[Target]:
    raw = results["raw"]["fp32"]
    best = max(raw["sentences"].values())
    at32 = raw["sentences"].get(32, best)
    plan = results["plan"]
    found: list[Target] = []
    for protocol, encoding in plan["protocols"]:
        label = f"{protocol} {encoding}"
        m = find_measurement(results, "service", protocol, encoding, "sentences", 100)
        if m:
            found.append(Target(f"100-text requests, {label}: share of raw onnxruntime (best batch)", m["texts_per_s"] / best, 0.90, "ratio"))
        for concurrency in [c for c in plan["concurrencies"] if c >= 32]:
            m = find_measurement(results, "service", protocol, encoding, "sentences", 1, concurrency)
            if m:
                found.append(Target(f"single text, c{concurrency}, {label}: share of raw onnxruntime batch 32", m["texts_per_s"] / at32, 0.75, "ratio"))
        m = find_measurement(results, "service", protocol, encoding, "sentences", 1, 1)
        if m:
            found.append(Target(f"single text, c1, {label}: p50 latency", m["p50_ms"], raw["single_p50_ms"] + 5, "ms", lower_is_better=True))
    headline = plan["headline_concurrency"]
    ours = find_measurement(results, "service", "http", "float", "sentences", 1, headline)
    peer = find_measurement(results, "infinity-emb", "http", "float", "sentences", 1, headline)
    if ours and peer:
        found.append(Target(f"single text, c{headline}, http float: service / infinity-emb", ours["texts_per_s"] / peer["texts_per_s"], 2.0, "x"))
    for per_request, concurrency in ((1, headline), (100, None)):
        fp32 = find_measurement(results, "service", "http", "float", "sentences", per_request, concurrency)
        int8 = find_measurement(results, "service int8", "http", "float", "sentences", per_request, concurrency)
        if fp32 and int8:
            found.append(Target(f"int8 / fp32 service throughput, {per_request}-text requests", int8["texts_per_s"] / fp32["texts_per_s"], 2.0, "x"))
    quality = results["service"]
    if "int8" in quality:
        drop = 1 - quality["int8"]["sts_spearman"] / quality["fp32"]["sts_spearman"]
        found.append(Target("int8 STS Spearman drop against fp32", 100 * drop, 1.0, "%", lower_is_better=True))
    return found


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def markdown(results: dict) -> str:
    raw = results["raw"]
    best = max(raw["fp32"]["sentences"].values())
    lines = [
        "# Throughput: the service against raw onnxruntime and infinity-emb",
        "",
        f"Made by `{results['command'].strip()}` from {results['started']} to {results['finished']}; every figure below is from that one run.",
        "Texts are the 1030 STS sentences in ../shared/data (mean about 15 tokens), and passages of about 150 tokens joined from them.",
        "Throughput is texts per second; a 100-text request counts 100. Latency is per request, from the load generator.",
        "",
        "## Machine",
        "",
        *markdown_table(["", ""], [[k, v] for k, v in results["machine"].items()]),
        "",
        "## Raw onnxruntime (in-process, same encoder and tokenizer, sorted by length)",
        "",
    ]
    rows = []
    for precision, figures in raw.items():
        for corpus in ("sentences", "passages"):
            for size, value in figures[corpus].items():
                rows.append([precision, corpus, size, f"{value:.0f}"])
        rows.append([precision, "one sentence at a time, p50 latency", 1, f"{figures['single_p50_ms']:.2f} ms"])
    lines += markdown_table(["precision", "texts", "batch", "texts/s"], rows)
    lines += ["", f"The same fp32 batch-32 figure measured again after everything else: {results['raw_fp32_batch32_at_end']:.0f} texts/s "
              f"({results['raw_fp32_batch32_at_end'] / raw['fp32']['sentences'][32] - 1:+.0%}): how much the machine drifted during the run."]
    lines += ["", "## Service and peer", "",
              f"Ratio: to raw onnxruntime's best fp32 batch on the same texts ({best:.0f} sentences/s; int8 rows to raw int8). "
              "Encoder batch: Triton's inferences per encoder execution. Load generator: its CPU time as a share of one core.", ""]
    rows = []
    for m in results["measurements"]:
        precision = "int8" if m["server"].endswith("int8") else "fp32"
        ceiling = max(raw.get(precision, raw["fp32"])[m["corpus"]].values())
        batch = f"{m['encoder_batch']:.1f}" if m["encoder_batch"] else "-"
        rows.append([m["server"], f"{m['protocol']} {m['encoding']}", m["corpus"], m["texts_per_request"], m["concurrency"],
                     f"{m['requests_per_s']:.0f}", f"{m['texts_per_s']:.0f}", f"{m['texts_per_s'] / ceiling:.2f}",
                     f"{m['p50_ms']:.1f}", f"{m['p99_ms']:.1f}", batch, f"{100 * m['loadgen_cpu_share']:.0f}%", m["errors"]])
    lines += markdown_table(["server", "protocol", "texts", "texts/request", "concurrency", "requests/s", "texts/s", "ratio",
                     "p50 ms", "p99 ms", "encoder batch", "load generator CPU", "errors"], rows)
    lines += ["", "## Where the CPU went (share of one core per component over each run; the machine has "
              f"{results['machine']['cores (usable)']})", ""]
    service_runs = [m for m in results["measurements"] if m["cpu_share"]]
    components = sorted({k for m in service_runs for k in m["cpu_share"]}, key=lambda k: (k != "gateway", k))
    rows = [[m["server"], f"{m['protocol']} {m['encoding']}", m["corpus"], m["texts_per_request"], m["concurrency"],
             *(f"{100 * m['cpu_share'].get(k, 0):.0f}%" for k in components), f"{100 * m['loadgen_cpu_share']:.0f}%",
             f"{100 * (sum(m['cpu_share'].values()) + m['loadgen_cpu_share']):.0f}%",
             f"{100 * m['machine_idle']:.0f}%", f"{100 * m['machine_steal']:.0f}%"] for m in service_runs]
    lines += ["Machine idle and steal are shares of all cores; steal is time the hypervisor gave these cores to other "
              "machines, and where it is high the run measured a slower machine.", ""]
    lines += markdown_table(["server", "protocol", "texts", "texts/request", "concurrency", *components, "load generator", "total",
                     "machine idle", "steal"], rows)
    lines += ["", "## Memory (RSS, MiB; Triton includes its Python-backend stubs, shared pages counted per process)", ""]
    rows = []
    for precision, service in results["service"].items():
        idle = service["idle_memory_mib"]
        peak = {}
        for m in results["measurements"]:
            if m["server"] == ("service" if precision == "fp32" else f"service {precision}"):
                for name, value in m["memory_mib"].items():
                    peak[name] = max(peak.get(name, 0), value)
        rows += [[f"service {precision}", name, idle[name], peak.get(name, "-")] for name in idle]
    if "peer" in results:
        peak = max((m["memory_mib"].get("infinity", 0) for m in results["measurements"] if m["server"] == "infinity-emb"), default=0)
        rows.append([f"infinity-emb {results['peer']['version']}", "infinity", results["peer"]["idle_memory_mib"]["infinity"], peak])
    lines += markdown_table(["server", "process tree", "idle", "peak under load"], rows)
    lines += ["", "## Quality", ""]
    lines += markdown_table(["export", "STS Spearman through the service"], [[p, f"{s['sts_spearman']:.4f}"] for p, s in results["service"].items()])
    lines += ["", "## Targets", ""]
    lines += markdown_table(["target", "measured", "required", "result"],
                    [[t.name, f"{t.measured:.2f} {t.unit}", f"{'<=' if t.lower_is_better else '>='} {t.required:.2f} {t.unit}", t.verdict()]
                     for t in targets(results)])
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[str, list] = {}
    for m in results["measurements"]:
        if m["texts_per_request"] == 1 and m["corpus"] == "sentences":
            series.setdefault(f"{m['server']} {m['protocol']} {m['encoding']}", []).append(m)
    for label, points in series.items():
        points.sort(key=lambda m: m["concurrency"])
        x = [m["concurrency"] for m in points]
        line = left.plot(x, [m["texts_per_s"] for m in points], marker="o", label=label)[0]
        right.plot(x, [m["p50_ms"] for m in points], marker="o", color=line.get_color(), label=f"{label} p50")
        right.plot(x, [m["p99_ms"] for m in points], marker="x", linestyle="--", color=line.get_color(), label=f"{label} p99")
    raw = results["raw"]["fp32"]["sentences"]
    left.axhline(max(raw.values()), color="black", linestyle=":", label="raw onnxruntime fp32, best batch")
    concurrencies = results["plan"]["concurrencies"]
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.set_xlabel("concurrency (single-text requests)")
    left.set_ylabel("texts/s")
    left.set_title("Throughput")
    right.set_yscale("log")
    right.set_ylabel("latency (ms)")
    right.set_title("Latency p50 (solid) and p99 (dashed)")
    left.legend(fontsize=7)
    right.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "throughput.md", out / "throughput.json", out / "throughput.png"]
    paths[0].write_text(markdown(results))
    paths[1].write_text(json.dumps(results, indent=1, default=str))
    plot(results, paths[2])
    return paths

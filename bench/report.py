"""Writes a throughput run as markdown (tables and targets), JSON (every figure) and a PNG plot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.pipeline_ceiling import LABEL

# The service with the Redis embedding cache on, under repeated queries (bench.throughput.run_cache).
CACHE_LABEL = "service cache"


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


def find_measurement(
    results: dict, server: str, protocol: str, encoding: str, corpus: str, per_request: int, concurrency: int | None = None
):
    for m in results["measurements"]:
        if (m["server"], m["protocol"], m["encoding"], m["corpus"], m["texts_per_request"]) == (
            server,
            protocol,
            encoding,
            corpus,
            per_request,
        ):
            if concurrency is None or m["concurrency"] == concurrency:
                return m
    return None


# The goals of issue 11, each judged on figures from the same run.
CEILING_REQUESTS_PER_S = 6000  # single texts over HTTP float at the ceiling's highest concurrency
CEILING_C1_P50_MS = 1.0
SINGLE_TEXT_SHARE_OF_RAW = {32: 0.85, 128: 0.92}  # fp32, HTTP float, by concurrency; of raw onnxruntime's best batch
GRPC_SHARE_OF_HTTP = 0.95
C1_P50_OVER_RAW_MS = 2.0
INT8_SPEEDUP = 2.0
BATCH_SHARE_OF_RAW = 0.95
PEER_SPEEDUP = 3.0
INT8_STS_DROP_PERCENT = 1.0

# The goals of issue 26 for the best CPU configuration within the quality bound, of raw fp32's best batch.
BEST_BATCH_OVER_RAW = 3.0  # 100-text requests
BEST_SINGLE_OVER_RAW = 1.5  # single texts at the headline concurrency
BEST_C1_P50_OVER_RAW_MS = 1.0  # over raw fp32's one-text p50
BEST = "service int8"


def _single(results: dict, server: str, protocol: str, concurrency: int):
    return find_measurement(results, server, protocol, "float", "sentences", 1, concurrency)


def targets(results: dict) -> list[Target]:
    raw = results["raw"]["fp32"]
    best = max(raw["sentences"].values())
    plan = results["plan"]
    headline = plan["headline_concurrency"]  # c32 in the full plan
    found: list[Target] = []

    ceiling = {
        m["concurrency"]: m
        for m in results["measurements"]
        if (m["server"], m["protocol"], m["encoding"], m["texts_per_request"]) == (LABEL, "http", "float", 1)
    }
    if ceiling:
        top = max(ceiling)
        found.append(
            Target(
                f"{LABEL}, single text, c{top}, http float: requests/s",
                ceiling[top]["requests_per_s"],
                CEILING_REQUESTS_PER_S,
                "requests/s",
            )
        )
    if 1 in ceiling:
        found.append(
            Target(
                f"{LABEL}, single text, c1, http float: p50 latency",
                ceiling[1]["p50_ms"],
                CEILING_C1_P50_MS,
                "ms",
                lower_is_better=True,
            )
        )

    for concurrency, share in SINGLE_TEXT_SHARE_OF_RAW.items():
        m = _single(results, "service", "http", concurrency)
        if m:
            found.append(
                Target(
                    f"single text, c{concurrency}, http float: share of raw onnxruntime (best batch)",
                    m["texts_per_s"] / best,
                    share,
                    "ratio",
                )
            )
    for concurrency in [c for c in plan["concurrencies"] if c >= headline]:
        http, grpc = _single(results, "service", "http", concurrency), _single(results, "service", "grpc", concurrency)
        if http and grpc:
            found.append(
                Target(
                    f"single text, c{concurrency}: grpc float / http float",
                    grpc["texts_per_s"] / http["texts_per_s"],
                    GRPC_SHARE_OF_HTTP,
                    "ratio",
                )
            )
    m = _single(results, "service", "http", 1)
    if m:
        found.append(
            Target(
                "single text, c1, http float: p50 latency",
                m["p50_ms"],
                raw["single_p50_ms"] + C1_P50_OVER_RAW_MS,
                "ms",
                lower_is_better=True,
            )
        )
    ours, int8 = _single(results, "service", "http", headline), _single(results, "service int8", "http", headline)
    if ours and int8:
        found.append(
            Target(
                f"single text, c{headline}, http float: int8 / fp32 service",
                int8["texts_per_s"] / ours["texts_per_s"],
                INT8_SPEEDUP,
                "x",
            )
        )
    for protocol, encoding in plan["protocols"]:
        m = find_measurement(results, "service", protocol, encoding, "sentences", 100)
        if m:
            found.append(
                Target(
                    f"100-text requests, {protocol} {encoding}: share of raw onnxruntime (best batch)",
                    m["texts_per_s"] / best,
                    BATCH_SHARE_OF_RAW,
                    "ratio",
                )
            )
    peer = _single(results, "infinity-emb", "http", headline)
    if ours and peer:
        found.append(
            Target(
                f"single text, c{headline}, http float: service / infinity-emb",
                ours["texts_per_s"] / peer["texts_per_s"],
                PEER_SPEEDUP,
                "x",
            )
        )
    found += _best_configuration_targets(results, best, headline)
    quality = results["service"]
    if "int8" in quality:
        drop = 1 - quality["int8"]["sts_spearman"] / quality["fp32"]["sts_spearman"]
        found.append(Target("int8 STS Spearman drop against fp32", 100 * drop, INT8_STS_DROP_PERCENT, "%", lower_is_better=True))
    return found


def _best_configuration_targets(results: dict, best: float, headline: int) -> list[Target]:
    found = []
    batch = find_measurement(results, BEST, "http", "float", "sentences", 100)
    if batch:
        found.append(
            Target(
                f"{BEST}, 100-text requests, http float / raw fp32 best batch",
                batch["texts_per_s"] / best,
                BEST_BATCH_OVER_RAW,
                "x",
            )
        )
    single = _single(results, BEST, "http", headline)
    if single:
        found.append(
            Target(
                f"{BEST}, single text, c{headline}, http float / raw fp32 best batch",
                single["texts_per_s"] / best,
                BEST_SINGLE_OVER_RAW,
                "x",
            )
        )
    alone = _single(results, BEST, "http", 1)
    if alone:
        limit = results["raw"]["fp32"]["single_p50_ms"] + BEST_C1_P50_OVER_RAW_MS
        found.append(
            Target(f"{BEST}, single text, c1, http float: p50 latency", alone["p50_ms"], limit, "ms", lower_is_better=True)
        )
    return found


def ladder_section(results: dict) -> list[str]:
    """Raw fp32 (the yardstick), raw int8, each service and infinity-emb in one table, STS quality beside each."""
    raw = results["raw"]
    yardstick = max(raw["fp32"]["sentences"].values())
    reference = raw["fp32"]["sts_spearman"]
    headline = results["plan"]["headline_concurrency"]

    def quality(spearman: float | None) -> list[str]:
        if spearman is None:
            return ["-", "-"]
        return [f"{spearman:.4f}", f"{max(0.0, 100 * (1 - spearman / reference)):.2f}%"]

    def rate(value: float | None) -> list[str]:
        return ["-", "-"] if value is None else [f"{value:.0f}", f"{value / yardstick:.2f}"]

    rows = [
        [
            f"raw onnxruntime {p}",
            *rate(max(f["sentences"].values())),
            "-",
            "-",
            f"{f['single_p50_ms']:.2f}",
            *quality(f.get("sts_spearman")),
        ]
        for p, f in raw.items()
    ]
    servers = [("service" if p == "fp32" else f"service {p}", s.get("sts_spearman")) for p, s in results["service"].items()]
    if "peer" in results:
        servers.append(("infinity-emb", results["peer"].get("sts_spearman")))
    for server, spearman in servers:
        hundreds = find_measurement(results, server, "http", "float", "sentences", 100)
        singles, alone = _single(results, server, "http", headline), _single(results, server, "http", 1)
        rows.append(
            [
                server,
                *rate(hundreds and hundreds["texts_per_s"]),
                *rate(singles and singles["texts_per_s"]),
                f"{alone['p50_ms']:.2f}" if alone else "-",
                *quality(spearman),
            ]
        )
    # Rungs are numbered: their names alone repeat the first cells of the other tables.
    rows = [[f"{rung}. {row[0]}", *row[1:]] for rung, row in enumerate(rows, 1)]
    return [
        "",
        "## The ladder",
        "",
        f"Texts/s and their ratio to raw fp32's best batch ({yardstick:.0f} sentences/s). Raw rows: best batch and one text's "
        f"p50; service and peer rows: 100-text requests at c{results['plan']['batch_concurrency']}, single texts at "
        f"c{headline}, and a single text's p50 at c1, all HTTP float. STS Spearman over the 515 pairs, raw rows "
        "embedded in batches of 32 in-process, the others through their API; the drop is from raw fp32 (0.00% where a row scores as high or higher), which matches sentence-transformers (cosine >= 0.9999).",
        "",
        *markdown_table(
            [
                "",
                "best batch or 100-text requests, texts/s",
                "ratio",
                f"single texts c{headline}, texts/s",
                "ratio",
                "one text p50 ms",
                "STS Spearman",
                "drop",
            ],
            rows,
        ),
    ]


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def cache_section(results: dict) -> list[str]:
    """Repeated queries with the Redis embedding cache on against the same bodies with it off."""
    off = find_measurement(results, "service", "http", "float zipf", "sentences", 1)
    on = find_measurement(results, CACHE_LABEL, "http", "float zipf", "sentences", 1)
    cache = results["cache"]
    return [
        "",
        "## Repeated queries with the embedding cache",
        "",
        f"Single sentences drawn with a Zipf law (exponent {cache['zipf_exponent']}) from the {cache['distinct_texts']} sentences, "
        f"at concurrency {on['concurrency']}; the cache (a local redis-server) starts empty, and the hit rate counts the whole run, "
        "warm-up included.",
        "",
        *markdown_table(
            ["", "texts/s", "p50 ms", "p99 ms", "cache hit rate"],
            [
                ["cache off", f"{off['texts_per_s']:.0f}", f"{off['p50_ms']:.1f}", f"{off['p99_ms']:.1f}", "-"],
                [
                    "cache on",
                    f"{on['texts_per_s']:.0f}",
                    f"{on['p50_ms']:.1f}",
                    f"{on['p99_ms']:.1f}",
                    f"{cache['hit_rate']:.1%}",
                ],
                ["on / off", f"{on['texts_per_s'] / off['texts_per_s']:.2f}", "", "", ""],
            ],
        ),
    ]


def markdown(results: dict) -> str:
    raw = results["raw"]
    best = max(raw["fp32"]["sentences"].values())
    lines = [
        "# Throughput: the service against raw onnxruntime and infinity-emb",
        "",
        f"Made by `{results['command'].strip()}` from {results['started']} to {results['finished']}; every figure below is from that one run.",
        "Texts are the 1030 STS sentences in export/data (mean about 15 tokens), and passages of about 150 tokens joined from them.",
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
    lines += [
        "",
        f"The same fp32 batch-32 figure measured again after everything else: {results['raw_fp32_batch32_at_end']:.0f} texts/s "
        f"({results['raw_fp32_batch32_at_end'] / raw['fp32']['sentences'][32] - 1:+.0%}): how much the machine drifted during the run.",
    ]
    lines += [
        "",
        "## Service and peer",
        "",
        f"Ratio: to raw onnxruntime's best fp32 batch on the same texts ({best:.0f} sentences/s; int8 rows to raw int8). "
        "Encoder batch: Triton's inferences per encoder execution. Load generator: its CPU time as a share of one core.",
        f"The {LABEL} rows are the service on a copy of the export whose encoder answers zeros at no cost "
        "(bench/pipeline_ceiling.py): the most requests the rest of the pipeline can carry.",
        "",
    ]
    rows = []
    for m in results["measurements"]:
        precision = "int8" if m["server"].endswith("int8") else "fp32"
        ceiling = max(raw.get(precision, raw["fp32"])[m["corpus"]].values())
        batch = f"{m['encoder_batch']:.1f}" if m["encoder_batch"] else "-"
        rows.append(
            [
                m["server"],
                f"{m['protocol']} {m['encoding']}",
                m["corpus"],
                m["texts_per_request"],
                m["concurrency"],
                f"{m['requests_per_s']:.0f}",
                f"{m['texts_per_s']:.0f}",
                f"{m['texts_per_s'] / ceiling:.2f}",
                f"{m['p50_ms']:.1f}",
                f"{m['p99_ms']:.1f}",
                batch,
                f"{100 * m['loadgen_cpu_share']:.0f}%",
                m["errors"],
            ]
        )
    lines += markdown_table(
        [
            "server",
            "protocol",
            "texts",
            "texts/request",
            "concurrency",
            "requests/s",
            "texts/s",
            "ratio",
            "p50 ms",
            "p99 ms",
            "encoder batch",
            "load generator CPU",
            "errors",
        ],
        rows,
    )
    lines += cache_section(results)
    lines += [
        "",
        "## Where the CPU went (share of one core per component over each run; the machine has "
        f"{results['machine']['cores (usable)']})",
        "",
    ]
    service_runs = [m for m in results["measurements"] if m["cpu_share"]]
    components = sorted({k for m in service_runs for k in m["cpu_share"]}, key=lambda k: (k != "gateway", k))
    rows = [
        [
            m["server"],
            f"{m['protocol']} {m['encoding']}",
            m["corpus"],
            m["texts_per_request"],
            m["concurrency"],
            *(f"{100 * m['cpu_share'].get(k, 0):.0f}%" for k in components),
            f"{100 * m['loadgen_cpu_share']:.0f}%",
            f"{100 * (sum(m['cpu_share'].values()) + m['loadgen_cpu_share']):.0f}%",
            f"{100 * m['machine_idle']:.0f}%",
            f"{100 * m['machine_steal']:.0f}%",
        ]
        for m in service_runs
    ]
    lines += [
        "Machine idle and steal are shares of all cores; steal is time the hypervisor gave these cores to other "
        "machines, and where it is high the run measured a slower machine.",
        "",
    ]
    lines += markdown_table(
        [
            "server",
            "protocol",
            "texts",
            "texts/request",
            "concurrency",
            *components,
            "load generator",
            "total",
            "machine idle",
            "steal",
        ],
        rows,
    )
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
        peak = max(
            (m["memory_mib"].get("infinity", 0) for m in results["measurements"] if m["server"] == "infinity-emb"), default=0
        )
        rows.append(
            [f"infinity-emb {results['peer']['version']}", "infinity", results["peer"]["idle_memory_mib"]["infinity"], peak]
        )
    lines += markdown_table(["server", "process tree", "idle", "peak under load"], rows)
    lines += ladder_section(results)
    lines += ["", "## Targets", ""]
    lines += markdown_table(
        ["target", "measured", "required", "result"],
        [
            [
                t.name,
                f"{t.measured:.2f} {t.unit}",
                f"{'<=' if t.lower_is_better else '>='} {t.required:.2f} {t.unit}",
                t.verdict(),
            ]
            for t in targets(results)
        ],
    )
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

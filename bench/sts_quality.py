"""STS quality of the served vectors, full size and compress_to_size=128, through the Aleph Alpha contract.

    python -m export && python -m gateway --http-port 8080 &
    python -m bench.sts_quality --url http://127.0.0.1:8080 --out bench/results/sts_quality.md

Spearman correlation between the cosine similarity of each STS pair and its gold score. The served
128-dim projection was fitted at export on these same sentences, so the table also gives a held-out
figure: PCA refitted (with the export's own code) on one half of the pairs and scored on the other.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from aleph_alpha_client import BatchSemanticEmbeddingRequest, Client, Prompt, SemanticRepresentation

from bench.cli import command_line
from export.compression import fit_pca
from export.datasets import DEFAULT_STS_PATH, read_sts_pairs


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of average ranks; the gold scores are integers, so ties matter."""

    def ranks(values: np.ndarray) -> np.ndarray:
        _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        starts = np.cumsum(counts) - counts
        return (starts + (counts - 1) / 2)[inverse]

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def pair_cosines(vectors: np.ndarray) -> np.ndarray:
    """vectors holds both sentences of every pair, in file order."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return (unit[0::2] * unit[1::2]).sum(axis=1)


def served(client: Client, model: str, texts: list[str], compress_to_size: int | None) -> tuple[np.ndarray, str]:
    request = BatchSemanticEmbeddingRequest(
        prompts=[Prompt.from_text(t) for t in texts],
        representation=SemanticRepresentation.Symmetric,
        compress_to_size=compress_to_size,
    )
    response = client.batch_semantic_embed(request, model=model)
    return np.array(response.embeddings, dtype=np.float64), response.model_version


def held_out_pca(full: np.ndarray, gold: np.ndarray, size: int) -> float:
    """Mean Spearman over two folds of pairs, PCA fitted on the other fold's sentences."""
    pairs = np.arange(len(gold))
    folds = [pairs % 2 == 0, pairs % 2 == 1]
    scores = []
    for fit_on, score_on in (folds, folds[::-1]):
        sentences = lambda mask: np.repeat(mask, 2)  # noqa: E731 - pair mask to sentence mask
        projection = fit_pca(full[sentences(fit_on)], size)
        projected = full[sentences(score_on)] @ projection.components.T
        scores.append(spearman(pair_cosines(projected), gold[score_on]))
    return float(np.mean(scores))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sts_quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="gateway HTTP address")
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--sts", type=Path, default=DEFAULT_STS_PATH, help="STS file: gold score and the two sentences per row")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here as well as to stdout")
    parser.add_argument(
        "--export-args", default="", help="options the served repository was exported with, recorded in the report"
    )
    args = parser.parse_args(argv)

    pairs = read_sts_pairs(args.sts)
    texts = [text for pair in pairs for text in (pair.first, pair.second)]
    gold = np.array([pair.score for pair in pairs])
    client = Client(token="unused", host=args.url)
    full, full_version = served(client, args.model, texts, None)
    compressed, compressed_version = served(client, args.model, texts, 128)

    compressed_score = spearman(pair_cosines(compressed), gold)
    rows = [
        (f"full, {full.shape[1]} dims", full_version, spearman(pair_cosines(full), gold)),
        ("compress_to_size=128 (served, PCA fitted on these sentences)", compressed_version, compressed_score),
        ("128, PCA held out (2-fold over pairs)", "refitted from the served full vectors", held_out_pca(full, gold, 128)),
    ]
    baseline = rows[0][2]
    lines = [
        f"# STS quality: {args.model}",
        "",
        f"Spearman of cosine similarity against the gold scores of {args.sts.name} ({len(pairs)} pairs), "
        f"measured through POST /batch_semantic_embed on {time.strftime('%Y-%m-%d')}.",
        "",
        "| vectors | model_version | Spearman | relative to full |",
        "|---|---|---|---|",
        *(f"| {name} | `{version}` | {score:.4f} | {100 * (score / baseline - 1):+.2f}% |" for name, version, score in rows),
        "",
        "Produced by:",
        "",
        "```",
        f"python -m export {args.export_args} --output-dir REPO && python -m gateway --model-repository REPO --http-port PORT &",
        command_line("python -m bench.sts_quality", argv),
        "```",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

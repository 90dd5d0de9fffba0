"""What attention controls do to a vector, measured on the STS sentences through the real aleph-alpha-client.

    python -m export && python -m gateway --http-port 8080 &
    python -m bench.control_effect --url http://127.0.0.1:8080

For each sentence, w is its longest content word (letters only, at least 4, not a stopword, once in the
sentence). Let u be the sentence's vector, d the vector of the sentence with w deleted, and s and a the
vectors with w suppressed (factor 0) and amplified (factor 10). Suppressing works when s is closer to d than u
is; amplifying works when a is farther from d than u is. The table gives how often each works, per mode.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import numpy as np
from aleph_alpha_client import BatchSemanticEmbeddingRequest, Client, Prompt, SemanticRepresentation, Text, TextControl

from bench.cli import command_line, table_parser
from export.datasets import sts_sentences

STOPWORDS = frozenset(
    "about above after again also because been before being below between both could does doing down during each from "
    "further have having here into more most other over same should some such than that their theirs them then there these "
    "they this those through under until very were what when where which while will with would your yours".split()
)
SUPPRESS, AMPLIFY = 0.0, 10.0


@dataclass(frozen=True)
class Case:
    text: str
    start: int  # of the content word w, in characters
    length: int

    @property
    def deleted(self) -> str:
        return re.sub(r"\s+", " ", self.text[: self.start] + self.text[self.start + self.length :]).strip()


def content_word_cases(texts: list[str]) -> list[Case]:
    """One case per sentence that has a content word whose deletion leaves some text."""
    cases = []
    for text in texts:
        words = [m for m in re.finditer(r"[A-Za-z]{4,}", text) if m.group().lower() not in STOPWORDS]
        once = [m for m in words if len(re.findall(rf"\b{re.escape(m.group())}\b", text, flags=re.IGNORECASE)) == 1]
        if not once:
            continue
        word = max(once, key=lambda m: (len(m.group()), -m.start()))
        case = Case(text, word.start(), len(word.group()))
        if case.deleted:
            cases.append(case)
    return cases


def _embed(client: Client, model: str, prompts: list[Prompt], log_additive: bool) -> np.ndarray:
    vectors = []
    for start in range(0, len(prompts), 100):
        request = BatchSemanticEmbeddingRequest(
            prompts=prompts[start : start + 100],
            representation=SemanticRepresentation.Symmetric,
            control_log_additive=log_additive,
        )
        vectors += client.batch_semantic_embed(request, model=model).embeddings
    unit = np.array(vectors, dtype=np.float64)
    return unit / np.linalg.norm(unit, axis=1, keepdims=True)


def effect_rates(client: Client, model: str, cases: list[Case], log_additive: bool) -> tuple[float, float]:
    """(how often suppressing w brings the vector closer to w deleted, how often amplifying w moves it away)."""
    plain = _embed(client, model, [Prompt.from_text(c.text) for c in cases], log_additive)
    deleted = _embed(client, model, [Prompt.from_text(c.deleted) for c in cases], log_additive)

    def controlled(factor: float) -> np.ndarray:
        prompts = [Prompt([Text(c.text, [TextControl(c.start, c.length, factor)])]) for c in cases]
        return _embed(client, model, prompts, log_additive)

    baseline = (plain * deleted).sum(1)
    closer = (controlled(SUPPRESS) * deleted).sum(1) > baseline
    farther = (controlled(AMPLIFY) * deleted).sum(1) < baseline
    return float(closer.mean()), float(farther.mean())


def main(argv: list[str] | None = None) -> int:
    parser = table_parser("bench.control_effect", __doc__, "control_effect.md")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--sentences", type=int, default=1030, help="how many STS sentences to draw cases from")
    args = parser.parse_args(argv)
    client = Client(token="unused", host=args.url, total_retries=0)
    cases = content_word_cases(sts_sentences()[: args.sentences])
    lines = [
        "# Attention controls: what suppressing and amplifying a content word does",
        "",
        f"`{command_line('python -m bench.control_effect', argv)}`, {args.model}, {len(cases)} STS sentences with a content word.",
        "",
        "| mode | factor 0: closer to the sentence without w | factor 10: farther from it |",
        "|---|---|---|",
    ]
    for log_additive in (True, False):
        closer, farther = effect_rates(client, args.model, cases, log_additive)
        mode = "control_log_additive: true" if log_additive else "control_log_additive: false"
        lines.append(f"| {mode} | {closer:.1%} | {farther:.1%} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

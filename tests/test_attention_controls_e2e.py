"""End to end: attention controls through the real clients and a real Triton match the reference implementation
(tests/atman_reference.py: the sentence-transformers model in PyTorch, float64, its attention patched from the
definition), and do what they are for.

Cases cover text controls in both overlap modes, token-id controls, both control_log_additive modes, factors 0,
0.1, 1 and 10, a position controlled twice and a contextual threshold, over the aleph-alpha-client (HTTP),
/batch_semantic_embed, gRPC and /embed. tests/test_model_families_e2e.py runs the same cases on the other families.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import requests
from aleph_alpha_client import (
    BatchSemanticEmbeddingRequest,
    Client,
    ControlTokenOverlap,
    Prompt,
    SemanticEmbeddingRequest,
    SemanticRepresentation,
    Text,
    TextControl,
    TokenControl,
    Tokens,
)

from bench.control_effect import content_word_cases, effect_rates
from export.datasets import sts_sentences
from harness.servers import MODEL_REPOSITORY
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc
from tests.atman_reference import content_and_factors, minilm_path, reference_embedding, reference_hidden_states

MIN_COSINE = 0.9999
FACTORS = (0.0, 0.1, 1.0, 10.0)
# Low enough that MiniLM's input embeddings spread a control to other tokens in half the contextual cases (checked below).
CONTEXTUAL_THRESHOLD = 0.2


def cases(texts: list[str], tokenizer_ids) -> list[tuple[list[dict], bool, float | None]]:
    """(prompt items in the Aleph Alpha JSON shape, control_log_additive, contextual threshold) per case.

    tokenizer_ids(text) gives a text's token ids without special tokens, for the token_ids items.
    """
    words = content_word_cases(texts)
    result = []
    for index, case in enumerate(words[:4]):
        for factor in FACTORS:
            for log_additive in (True, False):
                control = {"start": case.start, "length": case.length, "factor": factor}
                result.append(([{"type": "text", "data": case.text, "controls": [control]}], log_additive, None))
        # From the middle of the word to the end of the next: partial takes the whole word, complete does not.
        middle = case.start + case.length // 2
        span = {
            "start": middle,
            "length": min(len(case.text), case.start + case.length + 6) - middle,
            "factor": 0.1 if index % 2 else 10.0,
        }
        for overlap in ("partial", "complete"):
            result.append(
                ([{"type": "text", "data": case.text, "controls": [{**span, "token_overlap": overlap}]}], index % 2 == 0, None)
            )
        # Items joined: a controlled text, token ids with a control on one of them, and a span controlled twice.
        ids = tokenizer_ids(words[index + 4].text)
        items = [
            {
                "type": "text",
                "data": case.text,
                "controls": [
                    {"start": case.start, "length": case.length, "factor": 0.1},
                    {"start": case.start, "length": 2, "factor": 10.0},
                ],
            },
            {"type": "token_ids", "data": ids, "controls": [{"index": len(ids) // 2, "factor": FACTORS[index]}]},
        ]
        result.append((items, index % 2 == 1, None))
        for log_additive in (True, False):
            control = {"start": case.start, "length": case.length, "factor": 0.0 if log_additive else 10.0}
            result.append(([{"type": "text", "data": case.text, "controls": [control]}], log_additive, CONTEXTUAL_THRESHOLD))
    return result


def client_prompt(items: list[dict]) -> Prompt:
    """The aleph-alpha-client's own objects for the items: what a user of the client writes."""
    converted = []
    for item in items:
        if item["type"] == "text":
            controls = [
                TextControl(
                    c["start"],
                    c["length"],
                    c["factor"],
                    ControlTokenOverlap(c["token_overlap"]) if "token_overlap" in c else None,
                )
                for c in item["controls"]
            ]
            converted.append(Text(item["data"], controls))
        else:
            converted.append(Tokens(item["data"], [TokenControl(c["index"], c["factor"]) for c in item["controls"]]))
    return Prompt(converted)


def grpc_prompt(items: list[dict]) -> pb.Prompt:
    converted = []
    for item in items:
        if item["type"] == "text":
            controls = [
                pb.TextControl(
                    start=c["start"],
                    length=c["length"],
                    factor=c["factor"],
                    token_overlap=pb.TOKEN_OVERLAP_COMPLETE if c.get("token_overlap") == "complete" else pb.TOKEN_OVERLAP_PARTIAL,
                )
                for c in item["controls"]
            ]
            converted.append(pb.PromptItem(text=item["data"], text_controls=controls))
        else:
            controls = [pb.TokenControl(index=c["index"], factor=c["factor"]) for c in item["controls"]]
            converted.append(pb.PromptItem(token_ids=pb.TokenIds(ids=item["data"]), token_controls=controls))
    return pb.Prompt(items=converted)


def grpc_options(log_additive: bool, threshold: float | None) -> pb.ControlOptions:
    options = pb.ControlOptions(log_additive=log_additive)
    if threshold is not None:
        options.contextual_threshold = threshold
    return options


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def served_vectors(http_url: str, grpc_port: int, model: str, case_list, representation: str = "symmetric") -> dict[str, list]:
    """Every case's vector from the client's semantic_embed, from one batch_semantic_embed per option set, and from gRPC."""
    client = Client(token="unused", host=http_url, total_retries=0)
    aa_representation = SemanticRepresentation(representation)
    single = []
    for items, log_additive, threshold in case_list:
        request = SemanticEmbeddingRequest(
            prompt=client_prompt(items),
            representation=aa_representation,
            control_log_additive=log_additive,
            contextual_control_threshold=threshold,
        )
        single.append(client.semantic_embed(request, model=model).embedding)
    batched: list = [None] * len(case_list)
    groups: dict[tuple, list[int]] = {}
    for index, (_, log_additive, threshold) in enumerate(case_list):
        groups.setdefault((log_additive, threshold), []).append(index)
    for (log_additive, threshold), members in groups.items():
        request = BatchSemanticEmbeddingRequest(
            prompts=[client_prompt(case_list[i][0]) for i in members],
            representation=aa_representation,
            control_log_additive=log_additive,
            contextual_control_threshold=threshold,
        )
        for index, vector in zip(members, client.batch_semantic_embed(request, model=model).embeddings):
            batched[index] = vector
    over_grpc = []
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for items, log_additive, threshold in case_list:
            request = pb.SemanticEmbedRequest(
                model=model,
                prompt=grpc_prompt(items),
                representation=getattr(pb, f"REPRESENTATION_{representation.upper()}"),
                controls=grpc_options(log_additive, threshold),
            )
            over_grpc.append(list(stub.SemanticEmbed(request, timeout=60).embedding.values))
    return {"semantic_embed": single, "batch_semantic_embed": batched, "grpc": over_grpc}


def assert_cases_match_the_reference(model_dir, prefix: str, case_list, served: dict[str, list]) -> None:
    for index, (items, log_additive, threshold) in enumerate(case_list):
        expected = reference_embedding(model_dir, items, prefix, threshold, log_additive)
        for route, vectors in served.items():
            found = cosine(vectors[index], expected)
            assert found >= MIN_COSINE, (
                f"case {index} over {route} ({items}, log_additive={log_additive}, threshold={threshold}): {found:.6f}"
            )


@pytest.fixture(scope="module")
def minilm_cases(tokenizer):
    return cases(sts_sentences(), lambda text: tokenizer.encode(text, add_special_tokens=False).ids)


def test_the_cases_exercise_what_they_claim(minilm_cases):
    """Guards the case list itself: the contextual cases really spread, and the overlap modes really differ."""
    spread = 0
    for items, _, threshold in minilm_cases:
        if threshold is not None:
            spread += (
                content_and_factors(minilm_path(), items, "", threshold)[1]
                != content_and_factors(minilm_path(), items, "", None)[1]
            )
    assert spread >= 2
    overlaps = [items for items, _, _ in minilm_cases if "token_overlap" in items[0]["controls"][0]]
    assert any(
        content_and_factors(minilm_path(), a)[1] != content_and_factors(minilm_path(), b)[1]
        for a, b in zip(overlaps[0::2], overlaps[1::2])
    )


@pytest.mark.e2e
def test_controlled_vectors_match_the_reference_over_every_route(service, model_name, minilm_cases):
    served = served_vectors(service.http_url, service.grpc_port, model_name, minilm_cases)
    assert_cases_match_the_reference(minilm_path(), "", minilm_cases, served)


@pytest.mark.e2e
def test_a_factor_of_1_gives_the_uncontrolled_vector_and_other_factors_do_not(service, model_name):
    client = Client(token="unused", host=service.http_url, total_retries=0)
    text = "A man is playing a large flute."
    plain = client.semantic_embed(
        SemanticEmbeddingRequest(prompt=Prompt.from_text(text), representation=SemanticRepresentation.Symmetric), model=model_name
    )
    for factor, same in [(1.0, True), (0.0, False), (10.0, False)]:
        prompt = Prompt([Text(text, [TextControl(2, 3, factor)])])
        controlled = client.semantic_embed(
            SemanticEmbeddingRequest(prompt=prompt, representation=SemanticRepresentation.Symmetric), model=model_name
        )
        assert controlled.model_version == plain.model_version
        difference = np.abs(np.array(controlled.embedding) - np.array(plain.embedding)).max()
        assert (difference <= 1e-6) == same, (factor, difference)


@pytest.mark.e2e
def test_embed_layers_take_the_controls(service, model_name, minilm_cases):
    for items, log_additive, threshold in minilm_cases[:: max(1, len(minilm_cases) // 6)]:
        body = {
            "model": model_name,
            "prompt": items,
            "layers": [-1, 3, 0],
            "pooling": ["mean", "max"],
            "control_log_additive": log_additive,
            "contextual_control_threshold": threshold,
        }
        response = requests.post(f"{service.http_url}/embed", json=body, timeout=60)
        assert response.status_code == 200, response.text
        hidden = reference_hidden_states(minilm_path(), items, "", threshold, log_additive)
        for layer in (-1, 3, 0):
            pooled = response.json()["embeddings"][f"layer_{layer}"]
            assert cosine(pooled["mean"], hidden[layer].mean(axis=0)) >= MIN_COSINE
            assert cosine(pooled["max"], hidden[layer].max(axis=0)) >= MIN_COSINE


@pytest.mark.e2e
def test_controlled_prompts_take_the_compressed_pipeline_too(service, model_name, manifest):
    """compress_to_size=128 of a controlled prompt is the exported projection of its controlled full vector."""
    components = np.load(MODEL_REPOSITORY / manifest["steps"]["compression"] / "1" / "projection.npy")
    client = Client(token="unused", host=service.http_url, total_retries=0)
    prompt = Prompt([Text("Three dogs run across a field.", [TextControl(6, 4, 0.0)])])
    full = client.semantic_embed(
        SemanticEmbeddingRequest(prompt=prompt, representation=SemanticRepresentation.Document), model=model_name
    )
    small = client.semantic_embed(
        SemanticEmbeddingRequest(prompt=prompt, representation=SemanticRepresentation.Document, compress_to_size=128),
        model=model_name,
    )
    assert len(small.embedding) == 128
    assert cosine(small.embedding, components @ np.array(full.embedding)) >= MIN_COSINE


@pytest.mark.e2e
def test_suppressing_and_amplifying_a_content_word_do_what_they_are_for(service, model_name):
    """The full table over every STS sentence is bench/results/control_effect.md; here, the first 300 sentences."""
    client = Client(token="unused", host=service.http_url, total_retries=0)
    word_cases = content_word_cases(sts_sentences()[:300])
    assert len(word_cases) >= 250
    closer, farther = effect_rates(client, model_name, word_cases, log_additive=True)
    assert closer >= 0.90, f"factor 0 brought the vector closer to the sentence without w in {closer:.1%} of cases"
    assert farther >= 0.85, f"factor 10 moved the vector away from the sentence without w in {farther:.1%} of cases"

"""perf_analyzer's --input-data: one real STS sentence per request, with the answer each must get.

    python -m bench.perf_analyzer.make_input_data --triton 127.0.0.1:8001
        rewrites sts_sentences.json beside this file (committed): for the text ensemble, each request's TEXT and,
        as validation_data, its TOKEN_COUNT and its EMBEDDING, asked of that Triton one text at a time
    python -m bench.perf_analyzer.make_input_data --triton HOST:PORT --out FILE
        the same for another deployment (another CPU, a GPU, another export), into a file of its own
    python -m bench.perf_analyzer.make_input_data --gateway http://127.0.0.1:8080 --out FILE
        for `--service-kind openai --endpoint v1/embeddings`: each request's /v1/embeddings body (base64 vectors, as
        the openai client asks) and, as its validation, the whole response the gateway gave it alone

perf_analyzer compares outputs byte for byte, and 2.51 needs every output of the model in validation_data (an
output left out is "missing" or not by chance: its optional flag is never set). TOKEN_COUNT holds anywhere; the
vectors are bit-stable across batches on one machine (a row's result does not depend on the rows batched with it:
the suite checks it under load at concurrency 32), but a CPU whose kernels round differently (AVX2 against
AVX-512, say), a GPU or another export gives other bits. The committed file holds the vectors of the machine
that made it (bench/perf_analyzer/README.md names it); record a file of your own for any other deployment.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import numpy as np

from export.datasets import sts_sentences
from repository_contract.tensors import EMBEDDING, TEXT, TOKEN_COUNT

OUTPUT = Path(__file__).resolve().parent / "sts_sentences.json"
ROOT = Path(__file__).resolve().parent.parent.parent


def manifest_of(repository: Path) -> dict:
    (path,) = repository.glob("*/embedding_manifest.json")
    return json.loads(path.read_text())


def token_counts(repository: Path, texts: list[str]) -> list[int]:
    """What the ensemble answers as TOKEN_COUNT: the text's tokens with the special ones, as the tokenizer step counts
    them with the same tokenizer.json (which does not truncate: the count is the text's whole length)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(repository / manifest_of(repository)["tokenizer"]))
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]


def _request_line(request: dict) -> str:
    return json.dumps(request, ensure_ascii=False)


def render(texts: list[str], counts: list[int], embeddings: list[np.ndarray]) -> str:
    """The ensemble's input data, one request per line, so a change of the sentences reads as a small diff. Shapes leave
    out the batch dimension, as in the ensemble's config.pbtxt."""
    expected = []
    for count, embedding in zip(counts, embeddings, strict=True):
        vector = np.asarray(embedding, dtype="<f4")
        expected.append(
            {
                TOKEN_COUNT: {"content": [count], "shape": [1]},
                EMBEDDING: {"b64": base64.b64encode(vector.tobytes()).decode(), "shape": [vector.size]},
            }
        )
    requests = [{TEXT: {"content": [text], "shape": [1]}} for text in texts]
    return _document(requests, expected)


def _document(requests: list[dict], expected: list[dict]) -> str:
    return (
        '{"data": [\n' + ",\n".join(map(_request_line, requests)) + "\n],\n"
        '"validation_data": [\n' + ",\n".join(map(_request_line, expected)) + "\n]}\n"
    )


def expected_vectors(document: dict) -> np.ndarray:
    """The EMBEDDINGs an ensemble input data file expects, one row per request."""
    return np.stack([np.frombuffer(base64.b64decode(v[EMBEDDING]["b64"]), dtype="<f4") for v in document["validation_data"]])


def record_triton(url: str, model: str, texts: list[str]) -> list[np.ndarray]:
    """Each text's EMBEDDING from the Triton at `url` (gRPC), asked one text at a time."""
    import tritonclient.grpc as tritongrpc

    client = tritongrpc.InferenceServerClient(url)
    try:
        vectors = []
        for text in texts:
            tensor = tritongrpc.InferInput(TEXT, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
            result = client.infer(model, [tensor], outputs=[tritongrpc.InferRequestedOutput(EMBEDDING)])
            vectors.append(result.as_numpy(EMBEDDING)[0])
        return vectors
    finally:
        client.close()


def openai_body(model: str, text: str) -> dict:
    return {"model": model, "input": text, "encoding_format": "base64"}


def record_gateway(url: str, model: str, texts: list[str], headers: dict[str, str] | None = None) -> str:
    """Input data for perf_analyzer's openai service kind: each /v1/embeddings body, and as its validation the response
    the gateway at `url` gave it alone. perf_analyzer sends `payload` as it is and compares the response's bytes with
    `response` written compactly, which is how the gateway writes JSON."""
    import requests

    payloads, expected = [], []
    with requests.Session() as session:
        for text in texts:
            body = openai_body(model, text)
            response = session.post(f"{url}/v1/embeddings", json=body, headers=headers, timeout=60)
            response.raise_for_status()
            payloads.append({"payload": [body]})
            expected.append({"response": {"content": [response.json()]}})
    return _document(payloads, expected)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.perf_analyzer.make_input_data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--repository", type=Path, default=ROOT / "model_repository", help="the export whose model and tokenizer are meant"
    )
    parser.add_argument("--count", type=int, default=None, help="only the first N sentences")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--triton", metavar="HOST:GRPC_PORT", help="record the ensemble's answers from this Triton")
    source.add_argument("--gateway", metavar="URL", help="record /v1/embeddings answers from this gateway (openai service kind)")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"where to write (default with --triton: {OUTPUT.relative_to(ROOT)})"
    )
    args = parser.parse_args(argv)
    if args.out is None and args.gateway:
        parser.error("--gateway needs an --out")

    texts = sts_sentences()[: args.count]
    manifest = manifest_of(args.repository)
    print(f"asking {args.triton or args.gateway} for {len(texts)} answers, one at a time", flush=True)
    if args.gateway:
        document = record_gateway(args.gateway.rstrip("/"), manifest["name"], texts)
    else:
        embeddings = record_triton(args.triton, manifest["ensembles"]["text"], texts)
        document = render(texts, token_counts(args.repository, texts), embeddings)
    out = args.out or OUTPUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    print(f"wrote {len(texts)} requests with their expected answers to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

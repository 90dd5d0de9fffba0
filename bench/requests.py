"""Request bodies for the load generator, serialized once before a run so the generator only sends bytes."""

from __future__ import annotations

import base64

import orjson

# The gRPC method the load generator calls; its request is EmbedRequest.
GRPC_EMBED = "/embedding.v1.EmbeddingService/Embed"
SEMANTIC_EMBED = "/semantic_embed"
BATCH_SEMANTIC_EMBED = "/batch_semantic_embed"


def _groups(texts: list[str], per_request: int) -> list[list[str]]:
    """Consecutive runs of texts, wrapping around so every request holds exactly per_request texts."""
    count = max(1, len(texts) // per_request)
    return [[texts[(start + i) % len(texts)] for i in range(per_request)] for start in range(0, count * per_request, per_request)]


def openai_bodies(model: str, texts: list[str], per_request: int, encoding: str) -> list[bytes]:
    """POST /v1/embeddings bodies; one text is sent as a bare string, as the openai client does."""
    bodies = []
    for group in _groups(texts, per_request):
        body = {"model": model, "input": group[0] if per_request == 1 else group}
        if encoding == "base64":
            body["encoding_format"] = "base64"
        bodies.append(orjson.dumps(body))
    return bodies


def grpc_bodies(model: str, texts: list[str], per_request: int, encoding: str) -> list[bytes]:
    from proto.embedding.v1 import embedding_pb2 as pb

    wire = pb.VECTOR_ENCODING_PACKED_FLOAT32 if encoding == "packed" else pb.VECTOR_ENCODING_FLOAT
    return [
        pb.EmbedRequest(model=model, inputs=group, encoding=wire).SerializeToString() for group in _groups(texts, per_request)
    ]


def semantic_bodies(model: str, words: list, factor: float | None) -> list[bytes]:
    """POST /semantic_embed bodies, one sentence each; with a factor, a control on the sentence's content word
    (bench.control_effect.Case), so the request takes the attention-controlled path."""
    bodies = []
    for case in words:
        prompt = (
            case.text
            if factor is None
            else [
                {"type": "text", "data": case.text, "controls": [{"start": case.start, "length": case.length, "factor": factor}]}
            ]
        )
        bodies.append(orjson.dumps({"model": model, "prompt": prompt, "representation": "symmetric"}))
    return bodies


def image_groups(files: list[bytes], per_request: int) -> list[list[bytes]]:
    """One group of per_request files starting at each file in turn, wrapping around: with a number of files prime to
    per_request, every file is sent equally often, so the images of every request size are the same mix."""
    return [[files[(start * per_request + i) % len(files)] for i in range(per_request)] for start in range(len(files))]


def _image_item(data: bytes) -> dict:
    """An image item as the aleph-alpha-client's Image sends it, uncropped."""
    return {"type": "image", "data": base64.b64encode(data).decode()}


def image_bodies(model: str, files: list[bytes], per_request: int) -> list[bytes]:
    """POST /semantic_embed bodies of one image each (per_request 1), else POST /batch_semantic_embed bodies of
    per_request prompts of one image each, grouped as image_groups does."""
    if per_request == 1:
        return [orjson.dumps({"model": model, "prompt": [_image_item(f)], "representation": "symmetric"}) for f in files]
    return [
        orjson.dumps({"model": model, "prompts": [[_image_item(f)] for f in group], "representation": "symmetric"})
        for group in image_groups(files, per_request)
    ]

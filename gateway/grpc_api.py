"""The gRPC contract (proto/embedding/v1): a thin transport that turns messages into core calls and back."""

from __future__ import annotations

import functools
import inspect

import grpc
import numpy as np

from gateway.embedding_service import EmbedCall, EmbeddingService
from gateway.errors import ServiceError
from gateway.grpc_stream import StreamBatcher
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc


def vector_message(vector: np.ndarray, encoding: int, index: int = 0, token_count: int = 0) -> pb.Embedding:
    if encoding == pb.VECTOR_ENCODING_PACKED_FLOAT32:
        return pb.Embedding(values_float32_le=vector.astype("<f4").tobytes(), index=index, token_count=token_count)
    return pb.Embedding(values=vector.tolist(), index=index, token_count=token_count)


def _optional(message, field: str):
    return getattr(message, field) if message.HasField(field) else None


async def _abort(context: grpc.aio.ServicerContext, error: ServiceError):
    # The offending field also travels as metadata, so clients can point at it without parsing the message.
    metadata = (("field", error.param),) if error.param else ()
    await context.abort(error.grpc_status, error.message, metadata)


def contract_errors(method):
    """Every ServiceError leaves as the gRPC status its kind maps to; handlers never pick codes themselves."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for reply in method(self, request, context):
                    yield reply
            except ServiceError as error:
                await _abort(context, error)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except ServiceError as error:
            await _abort(context, error)

    return unary


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(self, service: EmbeddingService):
        self.service = service
        batch = min(m.max_batch_size for m in service.catalog.models.values())
        self.stream_batcher = StreamBatcher(service, max_batch=batch)

    @contract_errors
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        call = EmbedCall(
            model=request.model,
            texts=list(request.inputs),
            dimensions=_optional(request, "dimensions"),
            truncate=_optional(request, "truncate"),
            input_field="inputs",
        )
        result = await self.service.embed(call)
        embeddings = [
            vector_message(vector, request.encoding, index, int(count))
            for index, (vector, count) in enumerate(zip(result.embeddings, result.token_counts))
        ]
        usage = pb.Usage(prompt_tokens=result.total_tokens, total_tokens=result.total_tokens)
        return pb.EmbedResponse(model=result.model.name, model_version=result.model.model_version, embeddings=embeddings, usage=usage)

    @contract_errors
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        models = [
            pb.Model(
                name=m.name,
                model_version=m.model_version,
                dimensions=m.dimensions,
                max_sequence_length_tokens=m.max_sequence_length,
                num_layers=m.num_layers,
            )
            for m in self.service.catalog.models.values()
        ]
        return pb.ListModelsResponse(models=models)

    @contract_errors
    async def EmbedStream(self, requests, context):
        async for request, vector, token_count in self.stream_batcher.embed(requests):
            yield pb.EmbedStreamResponse(id=request.id, embedding=vector_message(vector, request.encoding, token_count=token_count))

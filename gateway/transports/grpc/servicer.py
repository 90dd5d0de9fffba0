"""The gRPC contract (proto/embedding/v1): a thin transport that turns messages into core calls and back."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re

import grpc
import numpy as np

from gateway.core.controls import ControlOptions, ImageControl, TextControl, TokenControl
from gateway.core.errors import ServiceError, internal, invalid, note_answered
from gateway.core.images import ImageInput
from gateway.core.prompts import PromptItem
from gateway.core.service import EmbedCall, EmbeddingService, EmbedLayersCall, SemanticEmbedCall, SemanticEmbedResult
from gateway.transports.grpc.status import grpc_status
from gateway.transports.grpc.stream import StreamBatcher
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc

logger = logging.getLogger("gateway")


def vector_message(vector: np.ndarray, encoding: int, index: int = 0, token_count: int = 0) -> pb.Embedding:
    if encoding == pb.VECTOR_ENCODING_PACKED_FLOAT32:
        return pb.Embedding(values_float32_le=vector.astype("<f4").tobytes(), index=index, token_count=token_count)
    return pb.Embedding(values=vector.tolist(), index=index, token_count=token_count)


def _optional(message, field: str):
    return getattr(message, field) if message.HasField(field) else None


def _enum_name(enum, value: int) -> str:
    """'POOLING_WEIGHTED_MEAN' -> 'weighted_mean'; a value this server does not know reaches the core's check as is."""
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.DESCRIPTOR.name).upper() + "_"  # TokenOverlap -> TOKEN_OVERLAP_
    return enum.Name(value).removeprefix(prefix).lower() if value in enum.values() else str(value)


def _representation(value: int) -> str:
    return "symmetric" if value == pb.REPRESENTATION_UNSPECIFIED else _enum_name(pb.Representation, value)


def _overlap(value: int) -> str:
    return _enum_name(pb.TokenOverlap, value or pb.TOKEN_OVERLAP_PARTIAL)


def _prompt_items(prompt: pb.Prompt, field: str) -> list[PromptItem]:
    items = []
    for item in prompt.items:
        kind = item.WhichOneof("item")
        if kind is None:
            raise invalid(f"'{field}' holds an item with neither text, token_ids nor image", field)
        if kind == "image":
            if item.text_controls or item.token_controls:
                raise invalid(f"'{field}': an image item takes image_controls", f"{field}.controls")
            crop = (item.image.crop.x, item.image.crop.y, item.image.crop.size) if item.image.HasField("crop") else None
            if any(not c.HasField("rect") for c in item.image_controls):
                raise invalid(f"'{field}': an image control needs its rect", f"{field}.controls.rect")
            image_controls = tuple(
                ImageControl(c.rect.left, c.rect.top, c.rect.width, c.rect.height, c.factor, _overlap(c.token_overlap))
                for c in item.image_controls
            )
            items.append(PromptItem("image", ImageInput(item.image.data, crop), image_controls))
            continue
        if item.image_controls:
            raise invalid(f"'{field}': image_controls apply to an image item", f"{field}.controls")
        if kind == "text":
            if item.token_controls:
                raise invalid(f"'{field}': a text item takes text_controls, not token_controls", f"{field}.controls")
            text_controls = tuple(TextControl(c.start, c.length, c.factor, _overlap(c.token_overlap)) for c in item.text_controls)
            items.append(PromptItem("text", item.text, text_controls))
        else:
            if item.text_controls:
                raise invalid(f"'{field}': a token_ids item takes token_controls, not text_controls", f"{field}.controls")
            token_controls = tuple(TokenControl(c.index, c.factor) for c in item.token_controls)
            items.append(PromptItem("token_ids", list(item.token_ids.ids), token_controls))
    return items


def _control_options(request) -> ControlOptions:
    if "controls" not in request.DESCRIPTOR.fields_by_name:
        return ControlOptions()  # the OpenAI-shaped Embed, which has no controls
    options = request.controls
    threshold = options.contextual_threshold if options.HasField("contextual_threshold") else None
    return ControlOptions.checked(
        options.log_additive if options.HasField("log_additive") else True, threshold, "controls.contextual_threshold"
    )


def _semantic_embeddings(result: SemanticEmbedResult, encoding: int) -> list[pb.Embedding]:
    return [
        vector_message(vector, encoding, index, count)
        for index, (vector, count) in enumerate(zip(result.embeddings, result.token_counts.tolist()))
    ]


def trailing_metadata(error: ServiceError) -> tuple[tuple[str, str], ...]:
    """What a client can act on without parsing the message: the offending field (ASCII only: gRPC refuses other
    metadata values, and field names are ASCII), and when to retry, as HTTP's Retry-After says it. The delay goes
    twice: `retry-after` in whole seconds, the same value HTTP sends, and `grpc-retry-pushback-ms`, which gRPC's
    own client retries wait for instead of their backoff (gRFC A6) when a retryPolicy covers the status."""
    metadata = []
    if error.param and error.param.isascii() and error.param.isprintable():
        metadata.append(("field", error.param))
    if error.retry_after_s is not None:
        metadata += [("retry-after", str(error.retry_after_s)), ("grpc-retry-pushback-ms", str(error.retry_after_s * 1000))]
    return tuple(metadata)


async def abort_with(context: grpc.aio.ServicerContext, error: ServiceError):
    note_answered(error)
    await context.abort(grpc_status(error), error.message, trailing_metadata(error))


_ENCODINGS = frozenset(pb.VectorEncoding.values())


def encoding_error(encoding: int) -> ServiceError | None:
    """proto3 enums are open: a value this server does not know arrives as a plain number and would silently get
    the default encoding."""
    if encoding in _ENCODINGS:
        return None
    return invalid(f"'encoding' must be one of {', '.join(pb.VectorEncoding.keys())}, not {encoding}", "encoding")


def _check_encoding(request) -> None:
    if (error := encoding_error(request.encoding)) is not None:
        raise error


def contract_errors(method):
    """Every error leaves as a gRPC status; handlers never pick codes themselves.

    A ServiceError becomes the status its kind maps to, any other exception is logged and answered INTERNAL
    with internal()'s message. context.abort's own AbortError and asyncio.CancelledError (a BaseException)
    pass through untouched.
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async with contextlib.aclosing(method(self, request, context)) as replies:
                    async for reply in replies:
                        yield reply
            except grpc.aio.AbortError:
                raise
            except ServiceError as error:
                await abort_with(context, error)
            except Exception as error:
                logger.error("unexpected error in gRPC %s", method.__name__, exc_info=error)
                await abort_with(context, internal())

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except ServiceError as error:
            await abort_with(context, error)
        except Exception as error:
            logger.error("unexpected error in gRPC %s", method.__name__, exc_info=error)
            await abort_with(context, internal())

    return unary


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(self, service: EmbeddingService):
        self.service = service
        batch = min(m.max_batch_size for m in service.models())
        self.stream_batcher = StreamBatcher(service, max_batch=batch, check=lambda item: encoding_error(item.encoding))

    @contract_errors
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        _check_encoding(request)
        if request.representation != pb.REPRESENTATION_UNSPECIFIED or request.HasField("compress_to_size") or request.normalize:
            return await self._embed_semantic(request, context)
        call = EmbedCall(
            model=request.model,
            texts=list(request.inputs),
            dimensions=_optional(request, "dimensions"),
            truncate=_optional(request, "truncate"),
            input_field="inputs",
            deadline=self._deadline(context),
        )
        result = await self.service.embed(call)
        embeddings = [
            vector_message(vector, request.encoding, index, count)
            for index, (vector, count) in enumerate(zip(result.embeddings, result.token_counts.tolist()))
        ]
        usage = pb.Usage(prompt_tokens=result.total_tokens, total_tokens=result.total_tokens)
        return pb.EmbedResponse(
            model=result.model.name, model_version=result.model.model_version, embeddings=embeddings, usage=usage
        )

    def _deadline(self, context: grpc.aio.ServicerContext):
        """The client's gRPC deadline when it set one sooner than the server's timeout."""
        return self.service.deadline(context.time_remaining())

    async def _embed_semantic(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        """Aleph Alpha's options take the semantic_embed path, which has no dimensions or truncate of its own."""
        for field in ("dimensions", "truncate"):
            if request.HasField(field):
                raise invalid(f"'{field}' cannot be combined with representation, compress_to_size or normalize", field)
        result = await self.service.semantic_embed(
            self._semantic_call(request, context, [[PromptItem("text", t)] for t in request.inputs], "inputs")
        )
        usage = pb.Usage(prompt_tokens=result.total_tokens, total_tokens=result.total_tokens)
        embeddings = _semantic_embeddings(result, request.encoding)
        return pb.EmbedResponse(model=request.model, model_version=result.model_version, embeddings=embeddings, usage=usage)

    def _semantic_call(self, request, context, prompts: list[list[PromptItem]], field: str) -> SemanticEmbedCall:
        return SemanticEmbedCall(
            model=request.model,
            prompts=prompts,
            representation=_representation(request.representation),
            compress_to_size=_optional(request, "compress_to_size"),
            normalize=request.normalize,
            prompt_field=field,
            deadline=self._deadline(context),
            controls=_control_options(request),
        )

    @contract_errors
    async def SemanticEmbed(self, request: pb.SemanticEmbedRequest, context) -> pb.SemanticEmbedResponse:
        _check_encoding(request)
        call = self._semantic_call(request, context, [_prompt_items(request.prompt, "prompt")], "prompt")
        result = await self.service.semantic_embed(call)
        (embedding,) = _semantic_embeddings(result, request.encoding)
        return pb.SemanticEmbedResponse(
            model_version=result.model_version, embedding=embedding, num_tokens_prompt_total=result.total_tokens
        )

    @contract_errors
    async def BatchSemanticEmbed(self, request: pb.BatchSemanticEmbedRequest, context) -> pb.BatchSemanticEmbedResponse:
        _check_encoding(request)
        prompts = [_prompt_items(prompt, f"prompts[{index}]") for index, prompt in enumerate(request.prompts)]
        result = await self.service.semantic_embed(self._semantic_call(request, context, prompts, "prompts"))
        return pb.BatchSemanticEmbedResponse(
            model_version=result.model_version,
            embeddings=_semantic_embeddings(result, request.encoding),
            num_tokens_prompt_total=result.total_tokens,
        )

    @contract_errors
    async def EmbedLayers(self, request: pb.EmbedLayersRequest, context) -> pb.EmbedLayersResponse:
        _check_encoding(request)
        poolings = [_enum_name(pb.Pooling, p) for p in request.poolings]
        call = EmbedLayersCall(
            model=request.model,
            prompt=_prompt_items(request.prompt, "prompt"),
            layers=list(request.layers),
            poolings=poolings,
            tokens=request.tokens,
            normalize=request.normalize,
            deadline=self._deadline(context),
            controls=_control_options(request),
        )
        result = await self.service.embed_layers(call)
        embeddings = [
            pb.LayerPooling(layer=layer, pooling=pooling, embedding=vector_message(pooled[name], request.encoding))
            for layer, pooled in result.layers
            for pooling, name in zip(request.poolings, poolings)
        ]
        return pb.EmbedLayersResponse(
            model_version=result.model_version,
            embeddings=embeddings,
            tokens=result.tokens or [],
            num_tokens_prompt_total=result.num_tokens,
        )

    @contract_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        tokens, token_ids = await self.service.tokenize(request.model, request.prompt)
        return pb.TokenizeResponse(tokens=tokens, token_ids=token_ids)

    @contract_errors
    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        return pb.DetokenizeResponse(result=await self.service.detokenize(request.model, list(request.token_ids)))

    @contract_errors
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        models = [
            pb.Model(
                name=m.name,
                model_version=m.model_version,
                dimensions=m.dimensions,
                max_sequence_length_tokens=m.max_sequence_length,
                num_layers=m.num_layers,
                compress_to_sizes=m.compress_to_sizes,
            )
            for m in self.service.models()
        ]
        return pb.ListModelsResponse(models=models)

    @contract_errors
    async def EmbedStream(self, requests, context):
        # Every id gets one reply: its embedding, or the error of its batch (the stream goes on). Only a broken
        # request stream (an undecodable message, say) ends the call with a status.
        async with contextlib.aclosing(self.stream_batcher.embed(requests)) as replies:
            async for reply in replies:
                item = reply.item
                if reply.error is not None:
                    error = pb.StreamError(
                        code=reply.error.kind.value, message=reply.error.message, field=reply.error.param or ""
                    )
                    yield pb.EmbedStreamResponse(id=item.id, error=error)
                else:
                    embedding = vector_message(reply.vector, item.encoding, token_count=reply.token_count)
                    yield pb.EmbedStreamResponse(id=item.id, embedding=embedding)

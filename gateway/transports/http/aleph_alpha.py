"""Aleph Alpha contract: /semantic_embed, /batch_semantic_embed, /embed, /tokenize, /detokenize and friends.

Works with the unmodified aleph-alpha-client (sync and async); what it sends and parses is in
../shared/contracts/CLIENTS.md. Handlers only translate: the steps live in gateway.core.service.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from gateway.core.controls import ControlOptions, ImageControl, TextControl, TokenControl
from gateway.core.errors import ServiceError, invalid
from gateway.core.images import ImageInput, from_base64
from gateway.core.prompts import PromptItem
from gateway.core.scheduler import PRIORITY_NICE, PRIORITY_NORMAL
from gateway.core.service import EmbeddingService, EmbedLayersCall, SemanticEmbedCall
from gateway.ops.request_context import request_id_field
from gateway.transports.http.lifecycle import cancel_on_disconnect, deadline, refuse_early
from gateway.transports.http.messages import contract_errors, json_response, parse_body
from gateway.transports.http.status import http_status

# The client's validate_version() requires major version 1 and at least 1.19.0.
API_VERSION = "1.19.0"

# Most bytes of JSON one character of a prompt takes (an escaped surrogate pair, \ud83d\ude00), more than a token id
# and its comma take; and room for the rest of a /tokenize or /detokenize body (model name, flags, whitespace).
JSON_BYTES_PER_CHAR = 12
TOKENIZE_BODY_SLACK_BYTES = 64 * 1024

# The client sends batch_semantic_embed in chunks of at most 100 prompts.
MAX_BATCH_PROMPTS = 100
Factor = StrictFloat | StrictInt


class _Item(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextControlBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    start: StrictInt
    length: StrictInt
    factor: Factor
    # Checked with the other controls' rules, so that an unknown value gets the same 400 over HTTP and gRPC.
    token_overlap: StrictStr | None = None

    def control(self) -> TextControl:
        return TextControl(self.start, self.length, float(self.factor), self.token_overlap or "partial")


class TokenControlBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    index: StrictInt
    factor: Factor

    def control(self) -> TokenControl:
        return TokenControl(self.index, float(self.factor))


class RectBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    left: Factor
    top: Factor
    width: Factor
    height: Factor


class ImageControlBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    rect: RectBody
    factor: Factor
    token_overlap: StrictStr | None = None

    def control(self) -> ImageControl:
        r = self.rect
        return ImageControl(
            float(r.left), float(r.top), float(r.width), float(r.height), float(self.factor), self.token_overlap or "partial"
        )


class TextItem(_Item):
    type: Literal["text"]
    data: StrictStr
    controls: list[TextControlBody] | None = None


class TokenIdsItem(_Item):
    type: Literal["token_ids"]
    data: list[StrictInt]
    controls: list[TokenControlBody] | None = None


class ImageItem(_Item):
    """An image as the aleph-alpha-client's Image sends it: base64 of the file, and a square crop when it has one."""

    type: Literal["image"]
    data: StrictStr | None = None
    x: StrictInt | None = None
    y: StrictInt | None = None
    size: StrictInt | None = None
    controls: list[ImageControlBody] | None = None

    def image(self, where: str, field: str) -> ImageInput:
        if self.data is None:
            raise invalid(f"'{where}': an image item needs its data (the file in base64)", field)
        cropping = (self.x, self.y, self.size)
        if any(value is None for value in cropping) and any(value is not None for value in cropping):
            raise invalid(f"'{where}': an image's crop takes x, y and size together", field)
        crop = None if self.x is None or self.y is None or self.size is None else (self.x, self.y, self.size)
        return ImageInput(from_base64(self.data, where, field), crop)


PromptField = StrictStr | list[Annotated[TextItem | TokenIdsItem | ImageItem, Field(discriminator="type")]]


class _EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    hosting: Literal["aleph-alpha"] | None = None
    normalize: StrictBool = False
    contextual_control_threshold: Factor | None = None
    control_log_additive: StrictBool | None = True

    def control_options(self) -> ControlOptions:
        return ControlOptions.checked(
            self.control_log_additive is not False, self.contextual_control_threshold, "contextual_control_threshold"
        )


class SemanticEmbedRequest(_EmbeddingRequest):
    prompt: PromptField
    representation: StrictStr
    compress_to_size: StrictInt | None = None


class BatchSemanticEmbedRequest(_EmbeddingRequest):
    prompts: list[PromptField] = Field(min_length=1, max_length=MAX_BATCH_PROMPTS)
    representation: StrictStr
    compress_to_size: StrictInt | None = None


class EmbedRequest(_EmbeddingRequest):
    prompt: PromptField
    layers: list[StrictInt]
    pooling: list[StrictStr]
    tokens: StrictBool | None = False
    type: StrictStr | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    prompt: StrictStr
    tokens: StrictBool = True
    token_ids: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    token_ids: list[StrictInt]


ADAPTERS = {
    cls: TypeAdapter(cls)
    for cls in (SemanticEmbedRequest, BatchSemanticEmbedRequest, EmbedRequest, TokenizeRequest, DetokenizeRequest)
}


def render_error(error: ServiceError) -> Response:
    body = {"error": error.message, "code": error.kind.value.upper(), "field": error.param}
    return json_response(body | request_id_field(), http_status(error))


def _items(prompt, field: str, index: int | None = None) -> list[PromptItem]:
    if isinstance(prompt, str):
        return [PromptItem("text", prompt)]
    where = field if index is None else f"{field}[{index}]"
    return [
        PromptItem(
            item.type,
            item.image(where, field) if isinstance(item, ImageItem) else item.data,
            tuple(control.control() for control in item.controls or ()),
        )
        for item in prompt
    ]


def _priority(request: Request) -> int:
    nice = request.query_params.get("nice", "false").lower()
    if nice not in ("true", "false"):
        raise invalid(f"query parameter 'nice' must be true or false, got {nice!r}", "nice")
    return PRIORITY_NICE if nice == "true" else PRIORITY_NORMAL


def routes(service: EmbeddingService, max_body_bytes: int) -> list[Route]:
    def tokenize_body_bytes() -> int:
        """A body larger than the longest prompt (or id list) tokenize takes can only be refused: refused unread (413),
        since reading and parsing megabytes is event-loop time that a client looping them would take from everyone."""
        return min(max_body_bytes, JSON_BYTES_PER_CHAR * service.max_tokenized_chars + TOKENIZE_BODY_SLACK_BYTES)

    async def parse(request: Request, cls, limit: int = max_body_bytes):
        return await parse_body(request, ADAPTERS[cls], limit)

    async def parse_embedding(request: Request, cls):
        """Refused before its body is read when the backlog is full; its deadline starts when it arrives."""
        expires = deadline(request, service)
        refuse_early(service, expires)
        return await parse(request, cls), expires

    async def semantic(request: Request, body, expires, prompts: list, field: str):
        call = SemanticEmbedCall(
            model=body.model,
            prompts=[_items(p, field, None if len(prompts) == 1 else i) for i, p in enumerate(prompts)],
            representation=body.representation,
            compress_to_size=body.compress_to_size,
            normalize=body.normalize,
            priority=_priority(request),
            prompt_field=field,
            deadline=expires,
            controls=body.control_options(),
        )
        return await cancel_on_disconnect(request, service.semantic_embed(call))

    @contract_errors(render_error)
    async def semantic_embed(request: Request):
        body, expires = await parse_embedding(request, SemanticEmbedRequest)
        result = await semantic(request, body, expires, [body.prompt], "prompt")
        return json_response(
            {
                "model_version": result.model_version,
                "embedding": result.embeddings[0],
                "num_tokens_prompt_total": result.total_tokens,
            }
        )

    @contract_errors(render_error)
    async def batch_semantic_embed(request: Request):
        body, expires = await parse_embedding(request, BatchSemanticEmbedRequest)
        result = await semantic(request, body, expires, body.prompts, "prompts")
        return json_response(
            {
                "model_version": result.model_version,
                "embeddings": result.embeddings,
                "num_tokens_prompt_total": result.total_tokens,
            }
        )

    @contract_errors(render_error)
    async def embed(request: Request):
        body, expires = await parse_embedding(request, EmbedRequest)
        if body.type is not None:
            raise invalid(f"'type' {body.type!r} is not supported; use /semantic_embed for semantic embeddings", "type")
        call = EmbedLayersCall(
            model=body.model,
            prompt=_items(body.prompt, "prompt"),
            layers=body.layers,
            poolings=body.pooling,
            tokens=bool(body.tokens),
            normalize=body.normalize,
            priority=_priority(request),
            deadline=expires,
            controls=body.control_options(),
        )
        result = await cancel_on_disconnect(request, service.embed_layers(call))
        return json_response(
            {
                "model_version": result.model_version,
                "embeddings": {f"layer_{layer}": pooled for layer, pooled in result.layers},
                "tokens": result.tokens,
                "num_tokens_prompt_total": result.num_tokens,
            }
        )

    @contract_errors(render_error)
    async def tokenize(request: Request):
        body = await parse(request, TokenizeRequest, tokenize_body_bytes())
        tokens, token_ids = await service.tokenize(body.model, body.prompt)
        return json_response({"tokens": tokens if body.tokens else None, "token_ids": token_ids if body.token_ids else None})

    @contract_errors(render_error)
    async def detokenize(request: Request):
        body = await parse(request, DetokenizeRequest, tokenize_body_bytes())
        return json_response({"result": await service.detokenize(body.model, body.token_ids)})

    @contract_errors(render_error)
    async def tokenizer(request: Request):
        model = service.model(request.path_params["model"])
        return Response(model.tokenizer.to_str(), media_type="application/json")

    @contract_errors(render_error)
    async def models_available(request: Request):
        return json_response(
            [
                {
                    "name": model.name,
                    "model_version": model.model_version,
                    "description": f"{model.name} sentence embeddings served by Triton",
                    "max_context_size": model.max_sequence_length,
                    "hostings": ["aleph-alpha"],
                    "embedding_dimensions": model.dimensions,
                    "compress_to_sizes": list(model.compress_to_sizes),
                    "semantic_embed_representations": sorted(model.prefixes),
                    "num_layers": model.num_layers,
                    "poolings": list(model.layer_poolings),
                    # Whether prompts may be an image, and what one counts as in num_tokens_prompt_total.
                    "image_support": model.vision is not None,
                    "image_tokens": model.vision.image_tokens if model.vision is not None else None,
                    # Where its encoder runs: the export's precision and target, and onnxruntime's providers for it.
                    "precision": model.precision,
                    "target": model.target,
                    "execution_providers": list(model.execution_providers),
                }
                for model in service.models()
            ]
        )

    async def version(request: Request):
        return PlainTextResponse(API_VERSION)

    return [
        Route("/semantic_embed", semantic_embed, methods=["POST"]),
        Route("/batch_semantic_embed", batch_semantic_embed, methods=["POST"]),
        Route("/embed", embed, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/models/{model}/tokenizer", tokenizer, methods=["GET"]),
        Route("/models_available", models_available, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
    ]

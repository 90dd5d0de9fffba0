"""Image prompts through every contract, over the fake Triton (fast tier): each image reaches the model's image
ensemble as its own bytes and crop, comes back in its prompt's place and counts as the model's image tokens, and
every bad image is refused with a 400 naming its prompt before Triton is called. The real image pipeline, against
sentence-transformers: tests/test_image_pipeline_e2e.py."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io

import grpc
import numpy as np
import pytest
from PIL import Image

from gateway.core.catalog import Catalog, ServedModel
from gateway.transports.grpc.servicer import EmbeddingServicer
from harness.waiting import eventually
from proto.embedding.v1 import embedding_pb2 as pb
from repository_contract.manifest import ImageEnsembles, Vision
from tests.fake_triton import ImageRow
from tests.http_harness import Gateway
from tests.test_fake_triton_service import Context, assert_rows, settle

NO_CROP = (-1, -1, -1)
IMAGE_TOKENS = 50
VISION_LAYERS, VISION_HIDDEN = 4, 48  # unlike the text encoder's 6 and 384


def picture(kind: str = "PNG", size: tuple[int, int] = (64, 48), mode: str = "RGB", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    out = io.BytesIO()
    image.save(out, kind)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def seeing(model: ServedModel, formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF")) -> ServedModel:
    """The model as if it had an image tower, with the image ensembles the export names."""
    size = None if model.compression is None else model.compression.size
    return dataclasses.replace(
        model,
        vision=Vision(
            ensembles=ImageEnsembles.named(model.name, size),
            controlled=ImageEnsembles.named(model.name, size, controlled=True),
            image_tokens=IMAGE_TOKENS,
            image_size=224,
            max_image_pixels=200 * 200,
            formats=formats,
            num_layers=VISION_LAYERS,
            hidden_size=VISION_HIDDEN,
        ),
    )


@pytest.fixture
async def gw(models):
    """The in-process gateway over a fake Triton, serving the exported model as if it had an image tower."""
    (model,) = models.models.values()
    gateway = Gateway(Catalog([seeing(model)]))
    yield gateway
    await settle()
    assert gateway.triton.refused == []
    assert gateway.scheduler.pending_texts == 0 and gateway.scheduler.rows_in_flight == 0


@pytest.mark.parametrize(("kind", "mode"), [("PNG", "RGBA"), ("JPEG", "RGB"), ("WEBP", "RGB"), ("GIF", "L"), ("PNG", "L")])
async def test_an_image_prompt_is_its_image_vector_and_counts_as_the_image_tokens(gw, kind, mode):
    data = picture(kind, mode=mode)
    response = await gw.post(
        "/semantic_embed", {"prompt": [{"type": "image", "data": b64(data), "controls": []}], "representation": "document"}
    )
    assert response.status == 200, response.body
    answer = response.json()
    assert_rows(gw.triton, [ImageRow(data, NO_CROP)], [answer["embedding"]])
    assert answer["num_tokens_prompt_total"] == IMAGE_TOKENS
    (call,) = gw.triton.calls
    assert call.lane.model == gw.model.vision.ensembles.embedding


async def test_a_batch_mixing_text_and_image_prompts_answers_each_in_its_place(gw):
    first, second = picture(seed=1), picture("JPEG", (80, 120), seed=2)
    prompts = [
        "a text between images",
        [{"type": "image", "data": b64(first), "controls": []}],
        [{"type": "image", "data": b64(second), "x": 10, "y": 20, "size": 64, "controls": []}],
        [{"type": "text", "data": "and a text item"}],
    ]
    response = await gw.post(
        "/batch_semantic_embed", {"prompts": prompts, "representation": "symmetric", "compress_to_size": 128}
    )
    assert response.status == 200, response.body
    answer = response.json()
    rows = ["a text between images", ImageRow(first, NO_CROP), ImageRow(second, (10, 20, 64)), "and a text item"]
    assert_rows(gw.triton, rows, answer["embeddings"], compressed=True)
    text_tokens = sum(gw.triton.expected(row)[1] for row in (rows[0], rows[3]))
    assert answer["num_tokens_prompt_total"] == text_tokens + 2 * IMAGE_TOKENS
    assert {call.lane.model for call in gw.triton.calls} >= {
        gw.model.vision.ensembles.compressed,
        gw.model.compression.ensembles.text,
    }


async def test_an_openai_data_uri_is_an_image_for_a_model_that_sees_images(gw):
    data = picture("WEBP")
    uri = f"data:image/webp;base64,{b64(data)}"
    response = await gw.post("/v1/embeddings", {"input": ["a text", uri]})
    assert response.status == 200, response.body
    answer = response.json()
    assert_rows(gw.triton, ["a text", ImageRow(data, NO_CROP)], [item["embedding"] for item in answer["data"]])
    assert answer["usage"]["prompt_tokens"] == gw.triton.expected("a text")[1] + IMAGE_TOKENS


async def test_a_data_uri_is_a_text_for_a_model_without_an_image_tower(models):
    gateway = Gateway(models)
    uri = f"data:image/png;base64,{b64(picture(size=(2, 2)))}"  # a text the model reads whole
    response = await gateway.post("/v1/embeddings", {"input": uri})
    assert response.status == 200, response.body
    assert_rows(gateway.triton, [uri], [response.json()["data"][0]["embedding"]])


async def test_a_grpc_image_item_carries_its_raw_bytes_and_crop(gw):
    data = picture("PNG", (90, 60))
    servicer = EmbeddingServicer(gw.service)
    image = pb.Image(data=data, crop=pb.Crop(x=5, y=0, size=60))
    request = pb.SemanticEmbedRequest(model=gw.model.name, prompt=pb.Prompt(items=[pb.PromptItem(image=image)]))
    response = await servicer.SemanticEmbed(request, Context())
    assert_rows(gw.triton, [ImageRow(data, (5, 0, 60))], [list(response.embedding.values)])
    assert response.num_tokens_prompt_total == IMAGE_TOKENS


def _tiff() -> bytes:
    return picture("TIFF")


BAD_IMAGES = {
    "not an image": ({"data": b64(b"these are not the pixels you are looking for")}, "is not an image"),
    "not base64": ({"data": "***"}, "not valid base64"),
    "a format not served": ({"data": b64(_tiff())}, "is a TIFF image"),
    "more pixels than the bound": ({"data": b64(picture(size=(201, 200)))}, "201x200 pixels"),
    "a crop outside the image": ({"data": b64(picture()), "x": 10, "y": 0, "size": 60}, "outside the 64x48 image"),
    "half a crop": ({"data": b64(picture()), "x": 10}, "x, y and size together"),
    "no data": ({}, "needs its data"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
async def test_a_bad_image_is_refused_naming_its_prompt_before_any_call(gw, case):
    item, says = BAD_IMAGES[case]
    prompts = ["fine", [{"type": "image", "controls": [], **item}]]
    response = await gw.post("/batch_semantic_embed", {"prompts": prompts, "representation": "symmetric"})
    assert response.status == 400, response.body
    answer = response.json()
    assert answer["field"] == "prompts" and answer["error"].startswith("'prompts[1]'") and says in answer["error"]
    assert gw.triton.calls == []


@pytest.mark.parametrize(
    ("prompt", "field", "says"),
    [
        ([{"type": "image", "data": b64(picture())}, {"type": "text", "data": "and words"}], "prompt", "mixes an image"),
        ([{"type": "text", "data": "words"}, {"type": "image", "data": b64(picture())}], "prompt", "mixes an image"),
    ],
    ids=["image then text", "text then image"],
)
async def test_a_prompt_an_image_cannot_be_embedded_in_is_refused(gw, prompt, field, says):
    response = await gw.post("/semantic_embed", {"prompt": prompt, "representation": "symmetric"})
    assert response.status == 400, response.body
    assert response.json()["field"] == field and says in response.json()["error"]
    assert gw.triton.calls == []


async def test_bad_images_are_refused_over_grpc_and_openai_too(gw):
    servicer = EmbeddingServicer(gw.service)
    context = Context()
    request = pb.SemanticEmbedRequest(model=gw.model.name, prompt=pb.Prompt(items=[pb.PromptItem(image=pb.Image(data=_tiff()))]))
    with pytest.raises(grpc.aio.AbortError):
        await servicer.SemanticEmbed(request, context)
    assert context.aborted is not None
    code, details, metadata = context.aborted
    assert code.name == "INVALID_ARGUMENT" and "is a TIFF image" in details and metadata["field"] == "prompt"

    response = await gw.post("/v1/embeddings", {"input": ["fine", "data:image/png;base64,***"]})
    assert response.status == 400
    error = response.json()["error"]
    assert error["param"] == "input" and error["message"].startswith("'input[1]'") and "base64" in error["message"]
    assert gw.triton.calls == []


async def test_images_get_a_400_from_a_model_without_an_image_tower(models):
    gateway = Gateway(models)
    item = {"type": "image", "data": b64(picture()), "controls": []}
    for path, body in [
        ("/semantic_embed", {"prompt": [item], "representation": "symmetric"}),
        ("/embed", {"prompt": [item], "layers": [-1], "pooling": ["mean"]}),
    ]:
        response = await gateway.post(path, body)
        assert response.status == 400 and "does not accept images" in response.json()["error"]
    assert gateway.triton.calls == []


async def test_embed_pools_the_image_encoders_layers_for_an_image(gw):
    data = picture("JPEG", (70, 50), seed=9)
    body = {"prompt": [{"type": "image", "data": b64(data)}], "layers": [0, -1, 2], "pooling": ["max", "mean"], "tokens": True}
    response = await gw.post("/embed", body)
    assert response.status == 200, response.body
    answer = response.json()
    pooled, count = gw.triton.expected(ImageRow(data, NO_CROP), layers=True)
    assert pooled.shape == (VISION_LAYERS + 1, len(gw.model.layer_poolings), VISION_HIDDEN)
    column = {name: index for index, name in enumerate(gw.model.layer_poolings)}
    for layer in (0, -1, 2):
        for pooling in ("max", "mean"):
            vector = answer["embeddings"][f"layer_{layer}"][pooling]
            np.testing.assert_allclose(vector, pooled[layer % (VISION_LAYERS + 1), column[pooling]], rtol=1e-5)
    assert answer["tokens"] is None and answer["num_tokens_prompt_total"] == count == IMAGE_TOKENS
    assert [call.lane.model for call in gw.triton.calls] == [gw.model.vision.ensembles.layers]

    # The image encoder's layers bound the request, not the text encoder's 6.
    response = await gw.post("/embed", body | {"layers": [VISION_LAYERS + 1]})
    assert (
        response.status == 400 and "image encoder" in response.json()["error"] and "patch embeddings" in response.json()["error"]
    )
    assert len(gw.triton.calls) == 1


async def test_the_model_listing_says_which_models_take_images(models, gw):
    (listed,) = (await gw.request("GET", "/models_available")).json()
    assert (listed["image_support"], listed["image_tokens"]) == (True, IMAGE_TOKENS)
    (listed,) = (await Gateway(models).request("GET", "/models_available")).json()
    assert (listed["image_support"], listed["image_tokens"]) == (False, None)


async def test_an_image_that_does_not_decode_fails_its_own_request_alone(models):
    """A file cut short passes the header check; the image step refuses it. Requests that shared its Triton call are
    sent again on their own and answered."""
    (model,) = models.models.values()
    gateway = Gateway(Catalog([seeing(model, ("PNG",))]), max_calls_per_lane=1)
    gateway.triton.stall()
    good = picture(seed=5)
    cut = picture(seed=6)[: len(good) // 2]  # its header whole, its pixels cut short

    def body(data: bytes) -> dict:
        return {"prompt": [{"type": "image", "data": b64(data)}], "representation": "symmetric"}

    first = asyncio.create_task(gateway.post("/semantic_embed", body(picture(seed=4))))
    await settle()
    shared = [asyncio.create_task(gateway.post("/semantic_embed", body(data))) for data in (good, cut, good)]
    # Their headers are read in threads: all three queue behind the first call, to share the next one.
    await eventually(lambda: gateway.scheduler.pending_texts == 4, 10, what="the three requests queued")
    gateway.triton.release()
    assert (await first).status == 200
    answers = [await task for task in shared]
    assert [answer.status for answer in answers] == [200, 400, 200]
    refused = answers[1].json()
    assert refused["field"] == "prompt" and "image cannot be decoded" in refused["error"] and "row" not in refused["error"]
    assert_rows(gateway.triton, [ImageRow(good, NO_CROP)] * 2, [answers[0].json()["embedding"], answers[2].json()["embedding"]])
    assert len(gateway.triton.calls[1].rows) == 3  # the three shared one call, then went again one by one
    await settle()
    assert gateway.scheduler.pending_texts == 0 and gateway.scheduler.rows_in_flight == 0


# -- attention controls on images -------------------------------------------------------------------------------------


def image_control(left, top, width, height, factor, token_overlap=None) -> dict:
    body = {"rect": {"left": left, "top": top, "width": width, "height": height}, "factor": factor}
    return body | ({"token_overlap": token_overlap} if token_overlap else {})


def sent(*values: float) -> tuple[float, ...]:
    """A control's row as the gateway sends it: float32."""
    return tuple(float(np.float32(v)) for v in values)


async def test_an_image_with_controls_goes_to_the_controlled_image_ensemble_with_its_rects(gw):
    data, plain = picture(seed=11), picture("JPEG", seed=12)
    controls = [image_control(0.1, 0.2, 0.5, 0.25, 0.0), image_control(0.5, 0, 0.5, 1, 3, "complete")]
    prompts = [
        [{"type": "image", "data": b64(data), "x": 4, "y": 0, "size": 40, "controls": controls}],
        [{"type": "image", "data": b64(plain), "controls": []}],
        "a text",
    ]
    body = {"prompts": prompts, "representation": "symmetric", "control_log_additive": False, "compress_to_size": 128}
    response = await gw.post("/batch_semantic_embed", body)
    assert response.status == 200, response.body
    expected_controls = (sent(0.1, 0.2, 0.5, 0.25, 0.0, 0), sent(0.5, 0, 0.5, 1, 3, 1))
    rows = [ImageRow(data, (4, 0, 40), expected_controls, log_additive=False), ImageRow(plain, NO_CROP), "a text"]
    answer = response.json()
    assert_rows(gw.triton, rows, answer["embeddings"], compressed=True)
    assert answer["num_tokens_prompt_total"] == 2 * IMAGE_TOKENS + gw.triton.expected("a text")[1]
    vision = gw.model.vision
    lanes = {call.lane.model: call.rows for call in gw.triton.calls}
    assert lanes[vision.controlled.compressed] == [rows[0]] and lanes[vision.ensembles.compressed] == [rows[1]]
    # Controls change the vector: the controlled ensemble answers another one than the plain image's.
    assert not np.allclose(
        gw.triton.expected(rows[0], compressed=True)[0], gw.triton.expected(ImageRow(data, (4, 0, 40)), compressed=True)[0]
    )


async def test_images_with_different_numbers_of_controls_are_padded_with_controls_that_change_nothing(gw):
    one, five = picture(seed=13), picture(seed=14)
    prompts = [
        [{"type": "image", "data": b64(one), "controls": [image_control(0, 0, 1, 1, 2)]}],
        [{"type": "image", "data": b64(five), "controls": [image_control(0, 0, 0.1 * i, 0.1, 2) for i in range(1, 6)]}],
    ]
    response = await gw.post("/batch_semantic_embed", {"prompts": prompts, "representation": "symmetric"})
    assert response.status == 200, response.body
    rows = [
        ImageRow(one, NO_CROP, (sent(0, 0, 1, 1, 2, 0),)),
        ImageRow(five, NO_CROP, tuple(sent(0, 0, 0.1 * i, 0.1, 2, 0) for i in range(1, 6))),
    ]
    assert_rows(gw.triton, rows, response.json()["embeddings"])
    # Padded to 4 and to 8 controls: two lanes of the controlled ensemble, each call holding its own.
    widths = sorted(call.lane.row_shape for call in gw.triton.calls)
    assert widths == [(4,), (8,)]


async def test_a_grpc_image_item_carries_its_controls(gw):
    data = picture("PNG", (90, 60), seed=15)
    servicer = EmbeddingServicer(gw.service)
    control = pb.ImageControl(
        rect=pb.Rect(left=0.25, top=0, width=0.5, height=1), factor=4, token_overlap=pb.TOKEN_OVERLAP_COMPLETE
    )
    item = pb.PromptItem(image=pb.Image(data=data), image_controls=[control])
    request = pb.SemanticEmbedRequest(model=gw.model.name, prompt=pb.Prompt(items=[item]))
    response = await servicer.SemanticEmbed(request, Context())
    assert_rows(gw.triton, [ImageRow(data, NO_CROP, (sent(0.25, 0, 0.5, 1, 4, 1),))], [list(response.embedding.values)])
    assert [call.lane.model for call in gw.triton.calls] == [gw.model.vision.controlled.embedding]


async def test_embed_pools_the_controlled_image_encoders_layers(gw):
    data = picture("JPEG", (70, 50), seed=16)
    item = {"type": "image", "data": b64(data), "controls": [image_control(0, 0, 0.5, 0.5, 0.5)]}
    response = await gw.post("/embed", {"prompt": [item], "layers": [-1], "pooling": ["mean"]})
    assert response.status == 200, response.body
    row = ImageRow(data, NO_CROP, (sent(0, 0, 0.5, 0.5, 0.5, 0),))
    pooled, _ = gw.triton.expected(row, layers=True)
    column = gw.model.layer_poolings.index("mean")
    np.testing.assert_allclose(response.json()["embeddings"]["layer_-1"]["mean"], pooled[-1, column], rtol=1e-5)
    assert [call.lane.model for call in gw.triton.calls] == [gw.model.vision.controlled.layers]


BAD_IMAGE_CONTROLS = {
    "a side past the image": ({"controls": [image_control(0, 0, 1.5, 1, 2)]}, "prompt.controls.rect.width", "rect.width"),
    "a negative side": ({"controls": [image_control(-0.1, 0, 0.5, 1, 2)]}, "prompt.controls.rect.left", "rect.left"),
    "a negative factor": ({"controls": [image_control(0, 0, 1, 1, -1)]}, "prompt.controls.factor", "factor"),
    "an unknown overlap": (
        {"controls": [image_control(0, 0, 1, 1, 2, "most")]},
        "prompt.controls.token_overlap",
        "token_overlap",
    ),
    "a text control": ({"controls": [{"start": 0, "length": 1, "factor": 2}]}, "prompt", "rect"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGE_CONTROLS))
async def test_a_bad_image_control_is_refused_naming_its_field_before_any_call(gw, case):
    item, field, says = BAD_IMAGE_CONTROLS[case]
    prompt = [{"type": "image", "data": b64(picture())} | item]
    response = await gw.post("/semantic_embed", {"prompt": prompt, "representation": "symmetric"})
    assert response.status == 400, response.body
    assert response.json()["field"] == field and says in response.json()["error"], response.json()
    assert gw.triton.calls == []


async def test_a_contextual_threshold_with_image_controls_is_refused_over_http_and_grpc(gw):
    item = {"type": "image", "data": b64(picture()), "controls": [image_control(0, 0, 1, 1, 2)]}
    body = {"prompt": [item], "representation": "symmetric", "contextual_control_threshold": 0.5}
    response = await gw.post("/semantic_embed", body)
    assert response.status == 400, response.body
    assert response.json()["field"] == "contextual_control_threshold" and "image control" in response.json()["error"]
    # Without controls on the image the threshold has nothing to do there, and is no error.
    plain = body | {"prompt": [item | {"controls": []}]}
    assert (await gw.post("/semantic_embed", plain)).status == 200

    servicer = EmbeddingServicer(gw.service)
    control = pb.ImageControl(rect=pb.Rect(left=0, top=0, width=1, height=1), factor=2)
    request = pb.SemanticEmbedRequest(
        model=gw.model.name,
        prompt=pb.Prompt(items=[pb.PromptItem(image=pb.Image(data=picture()), image_controls=[control])]),
        controls=pb.ControlOptions(contextual_threshold=0.5),
    )
    context = Context()
    with pytest.raises(grpc.aio.AbortError):
        await servicer.SemanticEmbed(request, context)
    code, details, metadata = context.aborted
    assert code.name == "INVALID_ARGUMENT" and metadata["field"] == "controls.contextual_threshold" and "image control" in details
    assert len(gw.triton.calls) == 1  # only the plain request's


@pytest.mark.parametrize(
    ("item", "says", "field"),
    [
        (
            pb.PromptItem(image=pb.Image(data=b"x"), image_controls=[pb.ImageControl(factor=2)]),
            "needs its rect",
            "prompt.controls.rect",
        ),
        (
            pb.PromptItem(image=pb.Image(data=b"x"), text_controls=[pb.TextControl(start=0, length=1, factor=2)]),
            "takes image_controls",
            "prompt.controls",
        ),
        (
            pb.PromptItem(text="words", image_controls=[pb.ImageControl(rect=pb.Rect(), factor=2)]),
            "apply to an image item",
            "prompt.controls",
        ),
    ],
    ids=["no rect", "text controls on an image", "image controls on a text"],
)
async def test_misplaced_or_incomplete_image_controls_are_refused_over_grpc(gw, item, says, field):
    request = pb.SemanticEmbedRequest(model=gw.model.name, prompt=pb.Prompt(items=[item]))
    context = Context()
    with pytest.raises(grpc.aio.AbortError):
        await EmbeddingServicer(gw.service).SemanticEmbed(request, context)
    code, details, metadata = context.aborted
    assert code.name == "INVALID_ARGUMENT" and says in details and metadata["field"] == field
    assert gw.triton.calls == []

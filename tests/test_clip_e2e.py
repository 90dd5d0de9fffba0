"""End to end: a tiny CLIP-style dual encoder, in both layouts sentence-transformers loads (a Transformer module with a
processor, and the legacy CLIPModel module), exported next to all-MiniLM into one repository and served by one real
Triton, answers plain tritonclient calls with sentence-transformers' own vectors, and so does the gateway over the
unmodified aleph-alpha-client (Image items, cropped or not), OpenAI data URIs and gRPC image items.

Images are real photographs (scikit-image's, export/photos.py) as PNG, JPEG, WebP and GIF files of several sizes,
aspect ratios and modes (grayscale, palette, RGBA, an EXIF-turned JPEG): `<model>-image` gives encode(PIL image),
`<model>-image-c128` that vector through the model's compression, a row with IMAGE_CROP gives encode() of the same
crop made with PIL, `<model>-image-layers` every layer of the vision tower pooled as transformers' own vision model
and image processor give them, and the model's text ensemble gives encode(text). Bad images are refused, alone, with
INVALID_ARG. Attention controls on images (the `-image-controlled` ensembles) match tests/atman_reference.py, an
independent PyTorch reference, over the aleph-alpha-client, gRPC, /embed and tritonclient.
"""

import base64
import concurrent.futures
import io

import grpc
import numpy as np
import openai
import pytest
import requests
import tritonclient.grpc as tritongrpc
from aleph_alpha_client import (
    BatchSemanticEmbeddingRequest,
    Client,
    Prompt,
    SemanticEmbeddingRequest,
    SemanticRepresentation,
)
from aleph_alpha_client import Image as AlephImage
from aleph_alpha_client.prompt import Cropping
from PIL import Image, ImageOps
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from export.datasets import sts_sentences
from export.photos import sample_files
from harness.servers import start_service
from harness.tiny_models import VISION_HIDDEN, VISION_LAYERS, build_tiny_clip
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc
from repository_contract.manifest import manifest_path, read
from repository_contract.naming import image_ensembles, step_name
from repository_contract.tensors import (
    CONTROL_LOG_ADDITIVE,
    EMBEDDING,
    IMAGE,
    IMAGE_CONTROLS,
    IMAGE_CROP,
    NO_CROP,
    POOLED,
    TEXT,
    TOKEN_COUNT,
)
from tests.test_model_families_e2e import MINILM, export_next_to_minilm

pytestmark = pytest.mark.e2e

# Served name -> the layout it is saved in.
MODELS = {"tiny-clip": "transformer", "tiny-clip-legacy": "legacy"}
MIN_COSINE = 0.9999
IMAGE_TOKENS = 17  # (32 / 8) ** 2 patches and the class token
FILES = sample_files()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-clip")
    return {name: build_tiny_clip(root / name, layout) for name, layout in MODELS.items()}


@pytest.fixture(scope="module")
def repository(tmp_path_factory, model_dirs):
    repository = tmp_path_factory.mktemp("repository")
    output = export_next_to_minilm(repository, model_dirs)
    # Texts, images and the image layers, per model.
    assert output.count("cosine min 1.000000") == 3 * len(MODELS), output
    return repository


@pytest.fixture(scope="module")
def service(tmp_path_factory, repository):
    running = start_service(tmp_path_factory.mktemp("clip"), repository)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def triton(service):
    client = tritongrpc.InferenceServerClient(service.triton_grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def st_models(model_dirs):
    from sentence_transformers import SentenceTransformer

    return {name: SentenceTransformer(str(path), device="cpu") for name, path in model_dirs.items()}


def upright(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


def infer_images(triton, model: str, files: list[bytes], crops=None, output: str = EMBEDDING) -> tuple[np.ndarray, np.ndarray]:
    crops = crops or [NO_CROP] * len(files)
    image = tritongrpc.InferInput(IMAGE, [len(files), 1], "BYTES")
    image.set_data_from_numpy(np.array(files, dtype=np.object_).reshape(-1, 1))
    crop = tritongrpc.InferInput(IMAGE_CROP, [len(files), 3], "INT64")
    crop.set_data_from_numpy(np.array(crops, dtype=np.int64))
    outputs = [tritongrpc.InferRequestedOutput(output), tritongrpc.InferRequestedOutput(TOKEN_COUNT)]
    result = triton.infer(model, [image, crop], outputs=outputs, client_timeout=120)
    return result.as_numpy(output), result.as_numpy(TOKEN_COUNT)


def assert_matches(served: np.ndarray, expected: np.ndarray, names: list[str]) -> None:
    cosine = (served * expected).sum(1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(expected, axis=1))
    worst = int(cosine.argmin())
    assert cosine.min() >= MIN_COSINE, f"{names[worst]}: cosine {cosine[worst]:.6f}"


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cosine of each row pair, in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return 1 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def projection(repository, model: str) -> np.ndarray:
    return np.load(repository / step_name(model, "compression") / "1" / "projection.npy")


def test_the_manifest_names_the_image_pipeline(repository):
    for model in MODELS:
        vision = read(manifest_path(repository, model)).vision
        assert vision is not None and vision.image_tokens == IMAGE_TOKENS and vision.image_size == 32
        assert vision.formats == ("PNG", "JPEG", "WEBP", "GIF")
        ensembles = vision.ensembles
        assert (ensembles.embedding, ensembles.compressed, ensembles.layers) == tuple(image_ensembles(model, 128).values())
        assert ensembles.layers == f"{model}-image-layers"
        # The vision tower's own depth and width, not the text tower's (2 layers of 64).
        assert (vision.num_layers, vision.hidden_size) == (VISION_LAYERS, VISION_HIDDEN) == (3, 48)
    assert read(manifest_path(repository, MINILM)).vision is None


@pytest.mark.parametrize("model", list(MODELS))
def test_image_vectors_match_encode_for_every_photo_and_format(triton, st_models, repository, model):
    names = list(FILES)
    expected = st_models[model].encode([upright(FILES[n]) for n in names])
    vectors, counts = infer_images(triton, image_ensembles(model, 128)["embedding"], [FILES[n] for n in names])
    assert vectors.shape == expected.shape and counts.tolist() == [[IMAGE_TOKENS]] * len(names)
    assert_matches(vectors, expected, names)
    compressed, _ = infer_images(triton, image_ensembles(model, 128)["compressed"], [FILES[n] for n in names])
    assert compressed.shape == (len(names), 128)
    assert_matches(compressed, expected @ projection(repository, model).T, names)


def test_single_image_requests_sent_together_are_each_answered_with_their_own_vector(triton, st_models):
    names = list(FILES)
    expected = st_models["tiny-clip"].encode([upright(FILES[n]) for n in names])
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda n: infer_images(triton, "tiny-clip-image", [FILES[n]])[0][0], names))
    assert_matches(np.stack(answers), expected, names)


def test_cropped_rows_match_encode_of_the_same_crop_made_with_pil(triton, st_models):
    rows = [
        ("astronaut-RGB.png", (100, 20, 256)),
        ("chelsea-RGB.jpeg", (0, 0, 300)),
        ("coffee-RGB-480x120.jpeg", (300, 10, 100)),
        ("camera-L.png", (0, 0, 512)),
        ("coffee-RGB-300x200-exif6.jpeg", (50, 150, 150)),  # within the upright 200x300 image only
        ("chelsea-P-200x133.gif", NO_CROP),
    ]
    crops = [crop for _, crop in rows]
    images = []
    for name, (x, y, size) in rows:
        image = upright(FILES[name])
        images.append(image if size < 0 else image.crop((x, y, x + size, y + size)))
    expected = st_models["tiny-clip"].encode(images)
    vectors, _ = infer_images(triton, "tiny-clip-image", [FILES[name] for name, _ in rows], crops)
    assert_matches(vectors, expected, [name for name, _ in rows])


def vision_layers_reference(model_dir, st_model, images: list[Image.Image], poolings: tuple[str, ...]) -> np.ndarray:
    """[images, layers + 1, poolings, hidden] from transformers alone: the model's CLIPImageProcessor, the vision tower
    of the loaded model with output_hidden_states (index 0: the embeddings after the pre-layernorm), each pooling over
    all the image's tokens, written out here in numpy."""
    import torch
    from transformers import CLIPImageProcessor

    pixels = CLIPImageProcessor.from_pretrained(str(model_dir))(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = st_model[0].model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    states = np.stack([layer.numpy() for layer in hidden], axis=1)  # [images, layers + 1, tokens, hidden]
    weights = np.arange(1, states.shape[2] + 1, dtype=np.float64)[:, None]  # token i (1-based) weighs i
    pooling = {
        "mean": lambda tokens: tokens.mean(axis=0),
        "weighted_mean": lambda tokens: (tokens * weights).sum(axis=0) / weights.sum(),
        "max": lambda tokens: tokens.max(axis=0),
        "last_token": lambda tokens: tokens[-1],
        "abs_max": lambda tokens: np.abs(tokens).max(axis=0),
    }
    return np.array([[[pooling[name](layer) for name in poolings] for layer in image] for image in states])


@pytest.mark.parametrize("model", list(MODELS))
def test_image_layers_match_the_vision_towers_hidden_states_pooled(triton, st_models, model_dirs, repository, model):
    """Every layer (0: the embeddings, 1..3 the vision tower's layers) and every pooling of each photo, and of cropped
    rows, against transformers: cosine >= 0.9999 for each (image, layer, pooling) vector."""
    manifest = read(manifest_path(repository, model))
    assert manifest.vision is not None
    poolings = manifest.layers.poolings
    assert poolings == ("mean", "weighted_mean", "max", "last_token", "abs_max")
    rows = [(name, NO_CROP) for name in FILES] + [
        ("astronaut-RGB.png", (100, 20, 256)),
        ("coffee-RGB-300x200-exif6.jpeg", (50, 150, 150)),
    ]
    images = []
    for name, (x, y, size) in rows:
        image = upright(FILES[name])
        images.append(image if size < 0 else image.crop((x, y, x + size, y + size)))
    expected = vision_layers_reference(model_dirs[model], st_models[model], images, poolings)
    pooled, counts = infer_images(
        triton, manifest.vision.ensembles.layers, [FILES[name] for name, _ in rows], [crop for _, crop in rows], POOLED
    )
    assert pooled.shape == expected.shape == (len(rows), VISION_LAYERS + 1, len(poolings), VISION_HIDDEN)
    assert counts.tolist() == [[IMAGE_TOKENS]] * len(rows)
    labels = [
        f"{name}{'' if crop == NO_CROP else f' crop {crop}'} layer {layer} {pooling}"
        for name, crop in rows
        for layer in range(VISION_LAYERS + 1)
        for pooling in poolings
    ]
    assert_matches(pooled.reshape(-1, VISION_HIDDEN), expected.reshape(-1, VISION_HIDDEN), labels)
    # Layers apart: a layer answered for another would not pass the check above.
    assert np.abs(pooled[:, 0] - pooled[:, -1]).max() > 0.1


@pytest.mark.parametrize("model", list(MODELS))
def test_the_text_ensemble_matches_encode(triton, st_models, model):
    texts = sts_sentences()[:192]
    vectors = []
    for begin in range(0, len(texts), 64):  # the ensembles' max_batch_size
        chunk = texts[begin : begin + 64]
        text = tritongrpc.InferInput(TEXT, [len(chunk), 1], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in chunk], dtype=np.object_).reshape(-1, 1))
        result = triton.infer(model, [text], outputs=[tritongrpc.InferRequestedOutput(EMBEDDING)], client_timeout=120)
        vectors.append(result.as_numpy(EMBEDDING))
    assert_matches(np.concatenate(vectors), st_models[model].encode(texts, prompt=""), texts)


def _encoded(image: Image.Image, format: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=format)
    return out.getvalue()


BAD = {
    "not an image": (b"%PDF-1.7 not an image", NO_CROP, "not an image in a supported format"),
    "bmp": (_encoded(Image.new("RGB", (40, 40)), "BMP"), NO_CROP, "the image format BMP is not supported"),
    "bomb": (_encoded(Image.new("L", (6000, 5000)), "PNG"), NO_CROP, "the image has 6000x5000 pixels, more than the 25000000"),
    "crop outside": (FILES["chelsea-RGB.jpeg"], (400, 0, 100), "the crop x=400, y=0, size=100 is not within the 451x300 image"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_image_is_refused_with_invalid_arg_while_others_are_answered(triton, st_models, kind):
    data, crop, message = BAD[kind]
    good = FILES["astronaut-RGB.png"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        bad = pool.submit(infer_images, triton, "tiny-clip-image", [good, data], [NO_CROP, crop])
        goods = [pool.submit(infer_images, triton, "tiny-clip-image", [good]) for _ in range(2)]
        with pytest.raises(InferenceServerException) as refused:
            bad.result()
        vectors = np.concatenate([g.result()[0] for g in goods])
    assert f"image-preprocess: row 1: {message}" in refused.value.message()
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert_matches(vectors, st_models["tiny-clip"].encode([upright(good)] * 2), ["astronaut"] * 2)


# -- the contracts: the unmodified aleph-alpha-client, openai and gRPC, through the gateway ----------------------------

CROPPED = [("astronaut-RGB.png", (100, 20, 256)), ("coffee-RGB-300x200-exif6.jpeg", (50, 150, 150)), ("camera-L.png", None)]


def expected_crops(st_model, rows) -> np.ndarray:
    images = []
    for name, crop in rows:
        image = upright(FILES[name])
        images.append(image if crop is None else image.crop((crop[0], crop[1], crop[0] + crop[2], crop[1] + crop[2])))
    return st_model.encode(images)


def test_image_prompts_over_the_aleph_alpha_client_match_encode(service, st_models):
    client = Client(token="unused", host=service.http_url, total_retries=0)
    names = list(FILES)
    vectors, totals = [], []
    for name in names:
        request = SemanticEmbeddingRequest(
            prompt=Prompt([AlephImage.from_bytes(FILES[name])]), representation=SemanticRepresentation.Symmetric
        )
        response = client.semantic_embed(request, model="tiny-clip")
        vectors.append(response.embedding)
        totals.append(response.num_tokens_prompt_total)
    assert totals == [IMAGE_TOKENS] * len(names)
    assert_matches(np.array(vectors), st_models["tiny-clip"].encode([upright(FILES[n]) for n in names]), names)

    prompts = [
        Prompt([AlephImage.from_bytes(FILES[name], cropping=None if crop is None else Cropping(*crop))]) for name, crop in CROPPED
    ]
    batch = BatchSemanticEmbeddingRequest(prompts=prompts, representation=SemanticRepresentation.Document)
    response = client.batch_semantic_embed(batch, model="tiny-clip-legacy")
    assert response.num_tokens_prompt_total == IMAGE_TOKENS * len(CROPPED)
    assert_matches(np.array(response.embeddings), expected_crops(st_models["tiny-clip-legacy"], CROPPED), [n for n, _ in CROPPED])


def test_openai_data_uris_and_grpc_image_items_match_encode(service, st_models):
    names = ["chelsea-RGB.jpeg", "astronaut-RGBA-300x300.png", "coffee-RGB-400x266.webp", "chelsea-P-200x133.gif"]
    expected = st_models["tiny-clip"].encode([upright(FILES[n]) for n in names])
    client = openai.OpenAI(base_url=f"{service.http_url}/v1", api_key="unused", max_retries=0)
    uris = [f"data:image/{name.rsplit('.', 1)[1]};base64,{base64.b64encode(FILES[name]).decode()}" for name in names]
    answer = client.embeddings.create(model="tiny-clip", input=[*uris, "a photo of a cat"])
    vectors = np.array([item.embedding for item in answer.data])
    assert_matches(vectors[:-1], expected, names)
    assert_matches(vectors[-1:], st_models["tiny-clip"].encode(["a photo of a cat"]), ["text"])

    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for name, crop in CROPPED:
            image = pb.Image(data=FILES[name], crop=None if crop is None else pb.Crop(x=crop[0], y=crop[1], size=crop[2]))
            request = pb.SemanticEmbedRequest(model="tiny-clip", prompt=pb.Prompt(items=[pb.PromptItem(image=image)]))
            reply = stub.SemanticEmbed(request, timeout=60)
            assert reply.num_tokens_prompt_total == IMAGE_TOKENS
            assert_matches(np.array([reply.embedding.values]), expected_crops(st_models["tiny-clip"], [(name, crop)]), [name])


@pytest.mark.parametrize("kind", [*BAD, "mixed with text"])
def test_a_bad_image_prompt_gets_a_400_naming_it_over_http_and_grpc(service, kind):
    data, crop, _ = BAD.get(kind, (FILES["astronaut-RGB.png"], NO_CROP, ""))
    item: dict = {"type": "image", "data": base64.b64encode(data).decode(), "controls": []}
    if crop != NO_CROP:
        item |= {"x": crop[0], "y": crop[1], "size": crop[2]}
    prompt = [item, {"type": "text", "data": "and words"}] if kind == "mixed with text" else [item]
    body = {"model": "tiny-clip", "prompts": ["fine", prompt], "representation": "symmetric"}
    response = requests.post(f"{service.http_url}/batch_semantic_embed", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == "prompts" and response.json()["error"].startswith("'prompts[1]'")

    items = [
        pb.PromptItem(image=pb.Image(data=data, crop=None if crop == NO_CROP else pb.Crop(x=crop[0], y=crop[1], size=crop[2])))
    ]
    if kind == "mixed with text":
        items.append(pb.PromptItem(text="and words"))
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        request = pb.SemanticEmbedRequest(model="tiny-clip", prompt=pb.Prompt(items=items))
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.EmbeddingServiceStub(channel).SemanticEmbed(request, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(refused.value.trailing_metadata())["field"] == "prompt"


def test_an_image_cut_short_gets_a_400_and_the_requests_beside_it_their_vectors(service, st_models):
    """Its header passes the gateway's check; the image step refuses its pixels. Requests that shared a Triton call with
    it are sent again on their own."""
    good = FILES["astronaut-RGB.png"]
    cut = FILES["chelsea-RGB.jpeg"][: len(FILES["chelsea-RGB.jpeg"]) // 3]

    def embed(data: bytes) -> requests.Response:
        prompt = [{"type": "image", "data": base64.b64encode(data).decode(), "controls": []}]
        body = {"model": "tiny-clip", "prompt": prompt, "representation": "symmetric"}
        return requests.post(f"{service.http_url}/semantic_embed", json=body, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(embed, [good, cut] * 4))
    assert [answer.status_code for answer in answers] == [200, 400] * 4, [a.text for a in answers]
    refused = answers[1].json()
    assert refused["field"] == "prompt" and "image cannot be decoded" in refused["error"], refused
    vectors = np.array([answer.json()["embedding"] for answer in answers[::2]])
    assert_matches(vectors, st_models["tiny-clip"].encode([upright(good)] * 4), ["astronaut"] * 4)


def test_embed_pools_the_vision_towers_layers_for_an_image_prompt(service, st_models, model_dirs, repository):
    """/embed over the gateway answers an image prompt with its image encoder's layers: the reference above."""
    manifest = read(manifest_path(repository, "tiny-clip"))
    poolings = manifest.layers.poolings
    name, crop = "coffee-RGB-300x200-exif6.jpeg", (50, 150, 150)
    item = {"type": "image", "data": base64.b64encode(FILES[name]).decode(), "x": crop[0], "y": crop[1], "size": crop[2]}
    body = {"model": "tiny-clip", "prompt": [item], "layers": [0, -1], "pooling": list(poolings), "tokens": True}
    answer = requests.post(f"{service.http_url}/embed", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    image = upright(FILES[name]).crop((crop[0], crop[1], crop[0] + crop[2], crop[1] + crop[2]))
    (expected,) = vision_layers_reference(model_dirs["tiny-clip"], st_models["tiny-clip"], [image], poolings)
    served = answer.json()
    assert served["tokens"] is None and served["num_tokens_prompt_total"] == IMAGE_TOKENS
    for layer in (0, -1):
        vectors = np.array([served["embeddings"][f"layer_{layer}"][pooling] for pooling in poolings])
        assert_matches(vectors, expected[layer], [f"layer {layer} {pooling}" for pooling in poolings])


# -- attention controls on images: the service against tests/atman_reference.py -----------------------------------------
# (photo, the item's crop or None, controls as (left, top, width, height, factor, token_overlap or None)). The rects are
# fractions of the whole upright photo: some reach past what the center crop or the item's crop keeps, one is a factor 0
# (a weight of exactly 0 in the log-additive mode), and the EXIF-turned photo's rect refers to it upright.
CONTROLLED = [
    ("chelsea-RGB.jpeg", None, [(0.3, 0.1, 0.4, 0.5, 0.0, None)]),
    ("coffee-RGB-480x120.jpeg", None, [(0.0, 0.0, 0.6, 1.0, 4.0, "complete"), (0.45, 0.2, 0.1, 0.3, 0.25, "partial")]),
    ("astronaut-RGBA-300x300.png", (60, 20, 200), [(0.5, 0.5, 0.5, 0.5, 8.0, None)]),
    ("coffee-RGB-300x200-exif6.jpeg", (50, 150, 150), [(0.0, 0.6, 1.0, 0.4, 0.1, "complete")]),
]


def controlled_items(cases=CONTROLLED) -> list[dict]:
    from tests import atman_reference

    items = []
    for name, crop, controls in cases:
        cropping = {} if crop is None else {"x": crop[0], "y": crop[1], "size": crop[2]}
        items.append(atman_reference.image(FILES[name], *[atman_reference.image_control(*c) for c in controls], **cropping))
    return items


def aleph_image(name: str, crop, controls) -> AlephImage:
    from aleph_alpha_client import ControlTokenOverlap, ImageControl

    overlaps = {None: None, "partial": ControlTokenOverlap.Partial, "complete": ControlTokenOverlap.Complete}
    return AlephImage.from_bytes(
        FILES[name],
        cropping=None if crop is None else Cropping(*crop),
        controls=[ImageControl(*c[:5], token_overlap=overlaps[c[5]]) for c in controls],
    )


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("log_additive", [True, False], ids=["log-additive", "multiplicative"])
def test_image_controls_over_the_aleph_alpha_client_match_the_independent_reference(service, model_dirs, model, log_additive):
    from tests import atman_reference

    client = Client(token="unused", host=service.http_url, total_retries=0)
    prompts = [Prompt([aleph_image(*case)]) for case in CONTROLLED]
    batch = BatchSemanticEmbeddingRequest(
        prompts=prompts, representation=SemanticRepresentation.Symmetric, control_log_additive=log_additive
    )
    response = client.batch_semantic_embed(batch, model=model)
    assert response.num_tokens_prompt_total == IMAGE_TOKENS * len(CONTROLLED)
    items = controlled_items()
    expected = np.array([atman_reference.reference_image_embedding(model_dirs[model], item, log_additive) for item in items])
    names = [name for name, _, _ in CONTROLLED]
    served = np.array(response.embeddings)
    assert_matches(served, expected, names)
    # The match tells the controls apart: the served vector is a hundred times closer to the reference than the photo's
    # uncontrolled vector is (which a tiny random model moves little, the multiplicative mode least).
    plain = np.array([atman_reference.reference_image_embedding(model_dirs[model], item | {"controls": []}) for item in items])
    to_reference, to_plain = cosine_distance(served, expected), cosine_distance(plain, expected)
    assert (to_reference < to_plain / 100).all(), (to_reference, to_plain)


def test_image_controls_over_grpc_and_embed_match_the_independent_reference(service, model_dirs, repository):
    from tests import atman_reference

    (name, _, controls), item = CONTROLLED[1], controlled_items()[1]
    overlaps = {None: pb.TOKEN_OVERLAP_UNSPECIFIED, "partial": pb.TOKEN_OVERLAP_PARTIAL, "complete": pb.TOKEN_OVERLAP_COMPLETE}
    image_controls = [
        pb.ImageControl(rect=pb.Rect(left=c[0], top=c[1], width=c[2], height=c[3]), factor=c[4], token_overlap=overlaps[c[5]])
        for c in controls
    ]
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        prompt = pb.Prompt(items=[pb.PromptItem(image=pb.Image(data=FILES[name]), image_controls=image_controls)])
        request = pb.SemanticEmbedRequest(
            model="tiny-clip", prompt=prompt, controls=pb.ControlOptions(log_additive=False), compress_to_size=128
        )
        reply = pb_grpc.EmbeddingServiceStub(channel).SemanticEmbed(request, timeout=60)
    expected = atman_reference.reference_image_embedding(model_dirs["tiny-clip"], item, log_additive=False)
    assert_matches(np.array([reply.embedding.values]), expected[None] @ projection(repository, "tiny-clip").T, [name])

    # /embed: every layer of the controlled vision tower, mean-pooled over the image's tokens.
    body = {"model": "tiny-clip", "prompt": [item], "layers": [0, 1, -1], "pooling": ["mean", "max"]}
    answer = requests.post(f"{service.http_url}/embed", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    states = atman_reference.reference_image_hidden_states(model_dirs["tiny-clip"], item)
    for layer in (0, 1, -1):
        served = answer.json()["embeddings"][f"layer_{layer}"]
        reference = np.array([states[layer].mean(axis=0), states[layer].max(axis=0)])
        assert_matches(np.array([served["mean"], served["max"]]), reference, [f"layer {layer} mean", f"layer {layer} max"])


def test_bad_image_controls_get_a_400_naming_the_field_over_http_and_grpc(service):
    from tests import atman_reference

    data = FILES["astronaut-RGB.png"]
    cases = [
        (atman_reference.image(data, atman_reference.image_control(0, 0, 1.5, 1, 2)), {}, "prompt.controls.rect.width"),
        (atman_reference.image(data, atman_reference.image_control(0, 0, 1, 1, -2)), {}, "prompt.controls.factor"),
        (
            atman_reference.image(data, atman_reference.image_control(0, 0, 1, 1, 2)),
            {"contextual_control_threshold": 0.5},
            "contextual_control_threshold",
        ),
    ]
    for item, options, field in cases:
        body = {"model": "tiny-clip", "prompt": [item], "representation": "symmetric"} | options
        response = requests.post(f"{service.http_url}/semantic_embed", json=body, timeout=60)
        assert response.status_code == 400 and response.json()["field"] == field, response.text
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        control = pb.ImageControl(rect=pb.Rect(left=0, top=0, width=1.5, height=1), factor=2)
        prompt = pb.Prompt(items=[pb.PromptItem(image=pb.Image(data=data), image_controls=[control])])
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.EmbeddingServiceStub(channel).SemanticEmbed(
                pb.SemanticEmbedRequest(model="tiny-clip", prompt=prompt), timeout=60
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(refused.value.trailing_metadata())["field"] == "prompt.controls.rect.width"


def test_the_controlled_image_ensemble_is_callable_directly(triton, model_dirs):
    """tritonclient and perf_analyzer reach `<model>-image-controlled` as they reach the plain image ensemble: the file,
    its crop, its controls (rows of IMAGE_CONTROL_FIELDS) and the mode."""
    from tests import atman_reference

    name, crop, controls = CONTROLLED[2]
    (item,) = controlled_items([CONTROLLED[2]])
    inputs = []
    for tensor, value in [
        (IMAGE, np.array([[FILES[name]]], dtype=np.object_)),
        (IMAGE_CROP, np.array([crop], dtype=np.int64)),
        (IMAGE_CONTROLS, np.array([[[*c[:5], c[5] == "complete"] for c in controls]], dtype=np.float32)),
        (CONTROL_LOG_ADDITIVE, np.array([[True]])),
    ]:
        infer_input = tritongrpc.InferInput(
            tensor, list(value.shape), "BYTES" if value.dtype == object else np_to_triton_dtype(value.dtype)
        )
        infer_input.set_data_from_numpy(value)
        inputs.append(infer_input)
    result = triton.infer(image_ensembles("tiny-clip", 128, controlled=True)["embedding"], inputs, client_timeout=120)
    expected = atman_reference.reference_image_embedding(model_dirs["tiny-clip"], item)
    assert_matches(result.as_numpy(EMBEDDING), expected[None], [name])
    assert result.as_numpy(TOKEN_COUNT).tolist() == [[IMAGE_TOKENS]]

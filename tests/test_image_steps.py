"""The image steps run without Triton (fast tier). image-preprocess (export/steps/image_preprocess.py): per format, mode, size
and aspect ratio of real photographs, its PIXEL_VALUES are what the model's own image processor (transformers'
CLIPImageProcessor) makes of the same image; each bad input is refused with its own INVALID_ARG error, alone, while
the other requests of the batch are answered. The vision encoders on stand-in graphs (the image vector's, and the
hidden states' of the image layers ensemble), and the layer-pooling step as the image layers ensemble runs it (the
vision tower's dims, every token real) against plain numpy and the export's torch reference. The same steps inside a
real Triton: tests/test_clip_e2e.py."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from export.photos import sample_files
from export.repository import IMAGE_STEP_ROLES, STEP_SOURCES
from export.steps.image_processing import FORMATS, PROCESSOR_FILE, ImageProcessor
from harness.tiny_models import IMAGE_SIZE, PATCH, PROCESSOR
from repository_contract.tensors import (
    ATTENTION_MASK,
    EMBEDDING,
    HIDDEN_STATES,
    IMAGE,
    IMAGE_CROP,
    NO_CROP,
    PIXEL_VALUES,
    POOLED,
    TOKEN_COUNT,
)
from tests.test_steps_without_triton import TritonError, load_step, output, request

MAX_PIXELS = 1_000_000
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2 + 1


@pytest.fixture(scope="module")
def step(tmp_path_factory):
    """The step as the export writes it: its config (the parameters it reads) and the processor's parameters."""
    model_dir = tmp_path_factory.mktemp("image") / "tiny-clip-image-preprocess"
    (model_dir / "1").mkdir(parents=True)
    assert IMAGE_STEP_ROLES["image-preprocess"] == "image_preprocess.py" and (STEP_SOURCES / "image_preprocess.py").exists()
    processor = ImageProcessor.from_processor_config(PROCESSOR, FORMATS, MAX_PIXELS)
    (model_dir / "1" / PROCESSOR_FILE).write_text(processor.to_json())
    (model_dir / "config.pbtxt").write_text(
        f'name: "{model_dir.name}"\nbackend: "python"\nparameters [{{ key: "image_tokens" value: {{ string_value: "{IMAGE_TOKENS}" }} }}]\n'
    )
    return load_step("image_preprocess", model_dir)


@pytest.fixture(scope="module")
def reference():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(**PROCESSOR)
    return lambda image: processor(images=image, return_tensors="np")["pixel_values"][0]


def image_request(files: list[bytes], crops: list[tuple[int, int, int]] | None = None):
    crops = crops or [NO_CROP] * len(files)
    return request({IMAGE: np.array(files, dtype=np.object_).reshape(-1, 1), IMAGE_CROP: np.array(crops, dtype=np.int64)})


def upright(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


def encoded(image: Image.Image, format: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=format)
    return out.getvalue()


FILES = sample_files()


@pytest.mark.parametrize("name", list(FILES))
def test_pixel_values_are_the_model_processors_for_every_format_and_mode(step, reference, name):
    (response,) = step.execute([image_request([FILES[name]])])
    pixels = output(response, PIXEL_VALUES)
    assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[0], reference(upright(FILES[name])), atol=1e-5)
    assert output(response, TOKEN_COUNT).tolist() == [[IMAGE_TOKENS]]
    # Every token of an image is real: the mask the image layers ensemble's layer pooling takes.
    mask = output(response, ATTENTION_MASK)
    assert mask.dtype == np.int64 and mask.tolist() == [[1] * IMAGE_TOKENS]


def test_the_photos_cover_every_format_and_mode():
    opened = [Image.open(io.BytesIO(data)) for data in FILES.values()]
    assert {image.format for image in opened} == set(FORMATS)
    assert {"RGB", "L", "P", "RGBA", "LA"} <= {image.mode for image in opened}
    assert any(image.getexif().get(0x0112, 1) != 1 for image in opened)


def test_a_request_of_several_rows_with_crops_is_answered_row_by_row(step, reference):
    names = list(FILES)[:4]
    crops = [NO_CROP, (10, 20, 100), NO_CROP, (0, 0, 133)]
    (response,) = step.execute([image_request([FILES[n] for n in names], crops)])
    pixels = output(response, PIXEL_VALUES)
    for row, (name, crop) in enumerate(zip(names, crops)):
        image = upright(FILES[name])
        if crop != NO_CROP:
            x, y, size = crop
            image = image.crop((x, y, x + size, y + size))
        np.testing.assert_allclose(pixels[row], reference(image), atol=1e-5, err_msg=name)
    assert output(response, TOKEN_COUNT).tolist() == [[IMAGE_TOKENS]] * 4
    assert output(response, ATTENTION_MASK).shape == (4, IMAGE_TOKENS)


def test_a_crop_is_taken_after_the_exif_orientation(step, reference):
    (name,) = [n for n in FILES if "exif" in n]
    image = upright(FILES[name])
    assert image.size == (200, 300)  # stored 300x200, shown turned
    (response,) = step.execute([image_request([FILES[name]], [(50, 150, 150)])])
    np.testing.assert_allclose(output(response, PIXEL_VALUES)[0], reference(image.crop((50, 150, 200, 300))), atol=1e-5)


def _bomb() -> bytes:
    """A PNG whose header declares 4000x4000 pixels: a few kB that would decode to 48 MB."""
    return encoded(Image.new("L", (4000, 4000)), "PNG")


BAD = {
    "not an image": (lambda: b"GIF89a, or so it says", None, "row 0: not an image in a supported format (PNG, JPEG, WEBP, GIF)"),
    "bmp": (lambda: encoded(Image.new("RGB", (40, 40)), "BMP"), None, "row 0: the image format BMP is not supported"),
    "tiff": (lambda: encoded(Image.new("RGB", (40, 40)), "TIFF"), None, "row 0: the image format TIFF is not supported"),
    "bomb": (_bomb, None, f"row 0: the image has 4000x4000 pixels, more than the {MAX_PIXELS} supported"),
    "crop outside": (
        lambda: FILES["chelsea-RGB.jpeg"],
        (400, 0, 100),
        "row 0: the crop x=400, y=0, size=100 is not within the 451x300 image",
    ),
    "negative crop": (lambda: FILES["chelsea-RGB.jpeg"], (-5, 0, 10), "row 0: the crop x=-5, y=0, size=10 is not within"),
    "truncated": (lambda: FILES["chelsea-RGB.jpeg"][:2000], None, "row 0: the JPEG image cannot be decoded"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_each_bad_image_is_refused_alone_with_what_is_wrong(step, reference, kind):
    make, crop, message = BAD[kind]
    good = FILES["coffee-RGB-400x266.webp"]
    responses = step.execute([image_request([good]), image_request([make()], [crop or NO_CROP]), image_request([good, good])])
    error = responses[1].error()
    assert responses[1].has_error() and error is not None
    assert error.message().startswith(f"image-preprocess: {message}"), error.message()
    assert error.code() == TritonError.INVALID_ARG
    expected = reference(upright(good))
    for answered, rows in ((responses[0], 1), (responses[2], 2)):
        pixels = output(answered, PIXEL_VALUES)
        assert len(pixels) == rows
        np.testing.assert_allclose(pixels[-1], expected, atol=1e-5)


def test_the_processor_parameters_round_trip_and_refuse_another_pipeline():
    processor = ImageProcessor.from_processor_config(PROCESSOR, FORMATS, MAX_PIXELS)
    assert ImageProcessor.from_json(processor.to_json()) == processor
    assert json.loads(processor.to_json())["shortest_edge"] == IMAGE_SIZE
    with pytest.raises(ValueError, match="not a shortest-edge resize"):
        ImageProcessor.from_processor_config({**PROCESSOR, "do_center_crop": False}, FORMATS, MAX_PIXELS)


SIDE, DIMENSIONS = 4, 5
# The stand-in hidden-states graph's [layers + 1, tokens, hidden]: its 48 values per image are the flattened pixels
# times a matrix, reshaped.
STATES = (3, 4, 4)


def _stand_in_graph(directory, output: str, columns: int, shape: list):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((3 * SIDE * SIDE, columns)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["pixel_values"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["product"])]
    initializers = [numpy_helper.from_array(weight, "w")]
    if len(shape) > 2:
        nodes.append(helper.make_node("Reshape", ["product", "shape"], [output]))
        initializers.append(numpy_helper.from_array(np.array([-1, *shape[1:]], dtype=np.int64), "shape"))
    else:
        nodes.append(helper.make_node("Identity", ["product"], [output]))
    graph = helper.make_graph(
        nodes,
        "vision",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)],
        initializers,
    )
    (directory / "1").mkdir(parents=True)
    # IR version 8: what the installed onnxruntime reads, whatever the onnx package would write by default.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(directory / "1" / "model.onnx"))
    return weight


def _python_config(directory, **params) -> None:
    items = ",".join(f'{{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())
    (directory / "config.pbtxt").write_text(f'name: "{directory.name}"\nbackend: "python"\nparameters [{items}]\n')


@pytest.fixture(scope="module")
def vision_graph(tmp_path_factory):
    """A stand-in vision graph with the exported one's tensor names: pixel values flattened, times a matrix."""
    model_dir = tmp_path_factory.mktemp("vision") / "tiny-clip-vision-encoder"
    weight = _stand_in_graph(model_dir, "embedding", DIMENSIONS, ["batch", DIMENSIONS])
    _python_config(model_dir, intra_op_threads=1, slice_rows=3, output=EMBEDDING)
    return load_step("vision_encoder", model_dir), weight


@pytest.fixture(scope="module")
def vision_layers_graph(tmp_path_factory):
    """The same step as the image layers ensemble's vision-layers-encoder: a stand-in graph answering hidden_states."""
    model_dir = tmp_path_factory.mktemp("vision-layers") / "tiny-clip-vision-layers-encoder"
    weight = _stand_in_graph(model_dir, "hidden_states", int(np.prod(STATES)), ["batch", *STATES])
    _python_config(model_dir, intra_op_threads=1, slice_rows=3, output=HIDDEN_STATES)
    return load_step("vision_encoder", model_dir), weight


def test_the_vision_encoder_answers_each_request_its_rows_across_slices(vision_graph):
    step, weight = vision_graph
    rng = np.random.default_rng(1)
    pixels = [rng.standard_normal((rows, 3, SIDE, SIDE)).astype(np.float32) for rows in (2, 5, 1)]
    responses = step.execute([request({PIXEL_VALUES: p}) for p in pixels])
    for answered, sent in zip(responses, pixels):
        np.testing.assert_allclose(output(answered, EMBEDDING), sent.reshape(len(sent), -1) @ weight, rtol=1e-5, atol=1e-5)


def test_the_vision_layers_encoder_answers_each_request_its_hidden_states(vision_layers_graph):
    step, weight = vision_layers_graph
    rng = np.random.default_rng(2)
    pixels = [rng.standard_normal((rows, 3, SIDE, SIDE)).astype(np.float32) for rows in (4, 1, 2)]
    responses = step.execute([request({PIXEL_VALUES: p}) for p in pixels])
    for answered, sent in zip(responses, pixels):
        states = output(answered, HIDDEN_STATES)
        assert states.shape == (len(sent), *STATES) and states.dtype == np.float32
        expected = (sent.reshape(len(sent), -1) @ weight).reshape(len(sent), *STATES)
        np.testing.assert_allclose(states, expected, rtol=1e-5, atol=1e-5)
        assert not any(tensor.name() == EMBEDDING for tensor in answered.output_tensors())


def test_the_vision_encoder_refuses_an_output_it_does_not_have(tmp_path):
    model_dir = tmp_path / "tiny-clip-vision-encoder"
    _stand_in_graph(model_dir, "embedding", DIMENSIONS, ["batch", DIMENSIONS])
    _python_config(model_dir, intra_op_threads=1, slice_rows=3, output=POOLED)
    with pytest.raises(ValueError, match="the output 'POOLED' is not EMBEDDING or HIDDEN_STATES"):
        load_step("vision_encoder", model_dir)


def test_a_request_the_vision_graph_refuses_fails_alone(vision_graph):
    step, weight = vision_graph
    good = np.ones((1, 3, SIDE, SIDE), dtype=np.float32)
    responses = step.execute([request({PIXEL_VALUES: good}), request({PIXEL_VALUES: np.ones((1, 3, 2, 2), dtype=np.float32)})])
    assert responses[1].has_error() and responses[1].error().message().startswith("vision-encoder: ")
    np.testing.assert_allclose(output(responses[0], EMBEDDING), good.reshape(1, -1) @ weight, rtol=1e-5)


def test_the_vision_layer_pooling_pools_every_token_of_an_image_as_the_export_validates(tmp_path):
    """vision-layer-pooling is the text pipeline's layer_pooling.py on the vision tower's states, with the image-preprocess
    step's mask of ones: each pooling over the class token and every patch, in the manifest's order, equal to plain
    numpy and to the torch reference the export validates the image layers with (export.validate.pooled_layers)."""
    from export.repository import LAYER_POOLINGS
    from export.validate import pooled_layers

    assert IMAGE_STEP_ROLES["vision-layer-pooling"] == "layer_pooling.py"
    model_dir = tmp_path / "tiny-clip-vision-layer-pooling"
    (model_dir / "1").mkdir(parents=True)
    _python_config(model_dir, poolings=",".join(LAYER_POOLINGS))
    step = load_step("layer_pooling", model_dir)
    layers, hidden = 4, 6
    rng = np.random.default_rng(3)
    sent = [rng.normal(size=(rows, layers, IMAGE_TOKENS, hidden)).astype(np.float32) for rows in (2, 3)]
    responses = step.execute(
        [request({HIDDEN_STATES: s, ATTENTION_MASK: np.ones((len(s), IMAGE_TOKENS), np.int64)}) for s in sent]
    )
    positions = np.arange(1, IMAGE_TOKENS + 1, dtype=np.float32)[:, None]  # token i (1-based) weighs i
    reference = {
        "mean": lambda tokens: tokens.mean(axis=0),
        "weighted_mean": lambda tokens: (tokens * positions).sum(axis=0) / positions.sum(),
        "max": lambda tokens: tokens.max(axis=0),
        "last_token": lambda tokens: tokens[-1],
        "abs_max": lambda tokens: np.abs(tokens).max(axis=0),
    }
    assert tuple(reference) == LAYER_POOLINGS
    for states, response in zip(sent, responses):
        pooled = output(response, POOLED)
        assert pooled.shape == (len(states), layers, len(LAYER_POOLINGS), hidden)
        np.testing.assert_allclose(pooled, pooled_layers(states, LAYER_POOLINGS).numpy(), rtol=1e-5, atol=1e-6)
        for row in range(len(states)):
            for layer in range(layers):
                for column, name in enumerate(LAYER_POOLINGS):
                    expected = reference[name](states[row, layer])
                    np.testing.assert_allclose(pooled[row, layer, column], expected, rtol=1e-5, atol=1e-6, err_msg=name)

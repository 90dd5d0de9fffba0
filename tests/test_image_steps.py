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
    CONTROL_FACTORS,
    CONTROL_LOG_ADDITIVE,
    EMBEDDING,
    HIDDEN_STATES,
    IMAGE,
    IMAGE_CONTROLS,
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
        f'name: "{model_dir.name}"\nbackend: "python"\nparameters [{{ key: "image_tokens" value: {{ string_value: "{IMAGE_TOKENS}" }} }}, '
        f'{{ key: "patch_size" value: {{ string_value: "{PATCH}" }} }}]\n'
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
    _python_config(model_dir, intra_op_threads=1, slice_rows=3)
    return load_step("vision_encoder", model_dir), weight


@pytest.fixture(scope="module")
def vision_layers_graph(tmp_path_factory):
    """The same step as the image layers ensemble's vision-layers-encoder: a stand-in graph answering hidden_states."""
    model_dir = tmp_path_factory.mktemp("vision-layers") / "tiny-clip-vision-layers-encoder"
    weight = _stand_in_graph(model_dir, "hidden_states", int(np.prod(STATES)), ["batch", *STATES])
    _python_config(model_dir, intra_op_threads=1, slice_rows=3)
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


# -- attention controls on images -------------------------------------------------------------------------------------
# The tiny model sees 32x32 pixels in patches of 8: a 4x4 grid, row-major after the class token.
GRID = IMAGE_SIZE // PATCH


def control(left, top, width, height, factor, complete=False) -> list[float]:
    return [left, top, width, height, factor, float(complete)]


def patch_grid(factors: np.ndarray) -> np.ndarray:
    """The patches' factors as the grid the model sees, after checking the class token's is 1."""
    assert factors.shape == (IMAGE_TOKENS,) and factors.dtype == np.float32 and factors[0] == 1.0
    return factors[1:].reshape(GRID, GRID)


@pytest.fixture(scope="module")
def processor():
    return ImageProcessor.from_processor_config(PROCESSOR, FORMATS, MAX_PIXELS)


def factors_of(processor, width, height, crop, *controls) -> np.ndarray:
    return patch_grid(processor.control_factors(width, height, crop, np.array(controls, dtype=np.float32), PATCH))


def test_a_rect_over_the_whole_image_reaches_every_patch_and_never_the_class_token(processor):
    np.testing.assert_array_equal(factors_of(processor, 64, 64, None, control(0, 0, 1, 1, 2.0)), np.full((GRID, GRID), 2.0))


def test_a_rect_reaches_the_patches_it_covers_by_their_share_of_it(processor):
    # The left half of a square image is the grid's two left columns.
    left_half = factors_of(processor, 64, 64, None, control(0, 0, 0.5, 1, 3.0))
    np.testing.assert_array_equal(left_half, np.array([[3, 3, 1, 1]] * GRID, dtype=np.float32))
    # A quarter of the first patch (8x8 of its 16x16 pixels): "partial" gives it a quarter of the factor's effect,
    # "complete" the whole factor, and no other patch is reached.
    for complete, expected in ((False, 1 + (5.0 - 1) / 4), (True, 5.0)):
        grid = factors_of(processor, 64, 64, None, control(0, 0, 0.125, 0.125, 5.0, complete))
        assert grid[0, 0] == pytest.approx(expected) and (np.delete(grid.reshape(-1), 0) == 1).all()
    # A factor of 0 over half a patch halves its weight in the partial sense.
    assert factors_of(processor, 64, 64, None, control(0, 0, 0.125, 0.25, 0.0))[0, 0] == pytest.approx(0.5)


def test_a_rect_that_only_touches_a_patch_does_not_reach_it(processor):
    # Exactly the first column: its edge is the second column's edge, which "complete" must not take as overlap.
    grid = factors_of(processor, 64, 64, None, control(0, 0, 0.25, 1, 4.0, complete=True))
    np.testing.assert_array_equal(grid, np.array([[4, 1, 1, 1]] * GRID, dtype=np.float32))


def test_rects_refer_to_the_whole_image_whatever_the_model_sees_of_it(processor):
    # A 128x64 image: the center crop keeps x in [32, 96). A strip at its left edge is cut away and reaches nothing.
    np.testing.assert_array_equal(factors_of(processor, 128, 64, None, control(0, 0, 0.2, 1, 9.0)), np.ones((GRID, GRID)))
    # x in [32, 64) is the left half of what it sees.
    np.testing.assert_array_equal(
        factors_of(processor, 128, 64, None, control(0.25, 0, 0.25, 1, 2.0)), np.array([[2, 2, 1, 1]] * GRID, dtype=np.float32)
    )
    # With the item's crop (64, 0, 64), the model sees x in [64, 128): the same rect is then outside, and x in
    # [64, 96) is the left half.
    np.testing.assert_array_equal(
        factors_of(processor, 128, 64, (64, 0, 64), control(0.25, 0, 0.25, 1, 2.0)), np.ones((GRID, GRID))
    )
    np.testing.assert_array_equal(
        factors_of(processor, 128, 64, (64, 0, 64), control(0.5, 0, 0.25, 1, 2.0)),
        np.array([[2, 2, 1, 1]] * GRID, dtype=np.float32),
    )


def test_controls_on_one_patch_multiply_and_the_product_is_capped(processor):
    grid = factors_of(processor, 64, 64, None, control(0, 0, 1, 1, 2.0), control(0, 0, 0.5, 1, 3.0))
    np.testing.assert_array_equal(grid, np.array([[6, 6, 2, 2]] * GRID, dtype=np.float32))
    capped = factors_of(processor, 64, 64, None, control(0, 0, 1, 1, 1e30), control(0, 0, 1, 1, 1e30))
    assert np.isfinite(capped).all() and (capped == np.float32(1e30)).all()


def controls_request(files: list[bytes], crops: list, controls: np.ndarray):
    sent = image_request(files, crops)
    sent.inputs().append(request({IMAGE_CONTROLS: controls.astype(np.float32)}).inputs()[0])
    return sent


def test_the_preprocess_step_answers_each_images_factors_from_its_own_size_and_crop(step, processor):
    names = ["coffee-RGB-400x266.webp", "coffee-RGB-300x200-exif6.jpeg"]
    files = [FILES[n] for n in names]
    crops = [NO_CROP, (0, 50, 200)]
    # The second row has one control and a padding control of factor 1, which changes nothing.
    controls = np.array(
        [
            [control(0.1, 0.2, 0.5, 0.5, 2.0), control(0.5, 0.5, 0.5, 0.5, 0.0, True)],
            [control(0, 0, 1, 0.5, 3.0), control(0, 0, 0, 0, 1.0)],
        ]
    )
    plain, controlled = step.execute([image_request(files, crops), controls_request(files, crops, controls)])
    np.testing.assert_array_equal(output(controlled, PIXEL_VALUES), output(plain, PIXEL_VALUES))
    assert all(tensor.name() != CONTROL_FACTORS for tensor in plain.output_tensors())
    factors = output(controlled, CONTROL_FACTORS)
    assert factors.shape == (2, IMAGE_TOKENS)
    for row, (name, crop) in enumerate(zip(names, crops)):
        # The rects are fractions of the image as shown: the EXIF-turned one is 200x300 upright.
        width, height = upright(FILES[name]).size
        expected = processor.control_factors(
            width, height, None if crop == NO_CROP else crop, controls[row][: 1 + (row == 0)], PATCH
        )
        np.testing.assert_array_equal(factors[row], expected)
    assert not (factors == 1).all(axis=1).any()  # every row's controls reached some patch


def test_the_preprocess_step_refuses_controls_that_do_not_match_its_rows(step):
    files = [FILES["coffee-RGB-400x266.webp"]] * 2
    (response,) = step.execute([controls_request(files, [NO_CROP] * 2, np.ones((1, 1, 6)))])
    assert response.has_error() and response.error().code() == TritonError.INVALID_ARG
    assert "IMAGE_CONTROLS (1, 1, 6)" in response.error().message()


def _controlled_stand_in(directory) -> dict[str, np.ndarray]:
    """A stand-in of the controlled vision graph: embedding = flat pixels @ w + factors @ v + mode * u, and hidden_states
    the same with other matrices, reshaped; the matrices returned."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    columns = {"embedding": DIMENSIONS, "hidden_states": int(np.prod(STATES))}
    weights = {}
    nodes = [
        helper.make_node("Flatten", ["pixel_values"], ["flat"]),
        helper.make_node("Cast", ["control_log_additive"], ["mode"], to=TensorProto.FLOAT),
    ]
    for name, width in columns.items():
        for part, rows in (("w", 3 * SIDE * SIDE), ("v", IMAGE_TOKENS), ("u", 1)):
            weights[f"{name}.{part}"] = rng.standard_normal((rows, width)).astype(np.float32)
        nodes += [
            helper.make_node("MatMul", ["flat", f"{name}.w"], [f"{name}.a"]),
            helper.make_node("MatMul", ["control_factors", f"{name}.v"], [f"{name}.b"]),
            helper.make_node("MatMul", ["mode", f"{name}.u"], [f"{name}.c"]),
            helper.make_node("Sum", [f"{name}.a", f"{name}.b", f"{name}.c"], [f"{name}.sum"]),
        ]
    nodes += [
        helper.make_node("Identity", ["embedding.sum"], ["embedding"]),
        helper.make_node("Reshape", ["hidden_states.sum", "shape"], ["hidden_states"]),
    ]
    initializers = [numpy_helper.from_array(value, key) for key, value in weights.items()]
    initializers.append(numpy_helper.from_array(np.array([-1, *STATES], dtype=np.int64), "shape"))
    graph = helper.make_graph(
        nodes,
        "vision-controlled",
        [
            helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, SIDE, SIDE]),
            helper.make_tensor_value_info("control_factors", TensorProto.FLOAT, ["batch", IMAGE_TOKENS]),
            helper.make_tensor_value_info("control_log_additive", TensorProto.BOOL, ["batch", 1]),
        ],
        [
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIMENSIONS]),
            helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["batch", *STATES]),
        ],
        initializers,
    )
    (directory / "1").mkdir(parents=True)
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(directory / "1" / "model.onnx")
    )
    return weights


def test_the_controlled_vision_encoder_runs_each_request_with_its_own_controls_and_outputs(tmp_path):
    model_dir = tmp_path / "tiny-clip-vision-controlled-encoder"
    weights = _controlled_stand_in(model_dir)
    _python_config(model_dir, intra_op_threads=1, slice_rows=2)
    step = load_step("vision_encoder", model_dir)
    rng = np.random.default_rng(5)
    sent = []
    for rows, mode in ((3, True), (1, False), (2, True)):
        sent.append(
            {
                PIXEL_VALUES: rng.standard_normal((rows, 3, SIDE, SIDE)).astype(np.float32),
                CONTROL_FACTORS: rng.uniform(0, 3, (rows, IMAGE_TOKENS)).astype(np.float32),
                CONTROL_LOG_ADDITIVE: np.full((rows, 1), mode),
            }
        )
    # The first two want the vector (a semantic embed), the last every layer (/embed): each gets only what it asked.
    responses = step.execute([request(sent[0], [EMBEDDING]), request(sent[1], [EMBEDDING]), request(sent[2], [HIDDEN_STATES])])

    def expected(name: str, feeds: dict) -> np.ndarray:
        flat = feeds[PIXEL_VALUES].reshape(len(feeds[PIXEL_VALUES]), -1)
        mode = feeds[CONTROL_LOG_ADDITIVE].astype(np.float32)
        return flat @ weights[f"{name}.w"] + feeds[CONTROL_FACTORS] @ weights[f"{name}.v"] + mode @ weights[f"{name}.u"]

    for response, feeds in zip(responses[:2], sent[:2]):
        np.testing.assert_allclose(output(response, EMBEDDING), expected("embedding", feeds), rtol=1e-5, atol=1e-5)
        assert [tensor.name() for tensor in response.output_tensors()] == [EMBEDDING]
    states = output(responses[2], HIDDEN_STATES)
    np.testing.assert_allclose(states, expected("hidden_states", sent[2]).reshape(2, *STATES), rtol=1e-5, atol=1e-5)
    assert [tensor.name() for tensor in responses[2].output_tensors()] == [HIDDEN_STATES]


def test_the_steps_factors_are_the_independent_references_on_real_photos(processor, tmp_path):
    """ImageProcessor.control_factors (closed-form boxes) against tests/atman_reference.py (a coverage mask carried
    through the crop, an exact area-average resize and the center crop), on photos of several aspect ratios, EXIF
    orientation included, with and without the item's crop, for random rects in both overlap modes."""
    from harness.tiny_models import build_tiny_clip
    from tests import atman_reference

    model_dir = build_tiny_clip(tmp_path / "clip")
    rng = np.random.default_rng(7)
    for name in ["chelsea-RGB.jpeg", "coffee-RGB-480x120.jpeg", "camera-L-90x240.webp", "coffee-RGB-300x200-exif6.jpeg"]:
        width, height = upright(FILES[name]).size
        side = min(width, height) // 2
        for crop in (None, (width - side, 0, side)):
            rects = [(*sorted(rng.uniform(0, 1, 2)), *sorted(rng.uniform(0, 1, 2))) for _ in range(3)]
            controls = [
                (left, top, right - left, bottom - top, float(rng.uniform(0, 4)), complete)
                for (left, right, top, bottom), complete in zip(rects, (False, True, False))
            ]
            item = atman_reference.image(
                FILES[name],
                *[atman_reference.image_control(*c[:5], "complete" if c[5] else "partial") for c in controls],
                **({} if crop is None else dict(zip("xy", crop[:2]), size=crop[2])),
            )
            expected = atman_reference.image_factors(model_dir, item)
            served = processor.control_factors(width, height, crop, np.array(controls, dtype=np.float32), PATCH)
            np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6, err_msg=f"{name} {crop}")

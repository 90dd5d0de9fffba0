"""The attention-controls (AtMan) reference in tests/atman_reference.py, checked against its definition: without
controls it is sentence-transformers itself, a factor 0 removes a key from every layer and head, a row with nothing
left to attend stays uncontrolled, spans resolve to the right tokens, image rectangles resolve to the right patches
as the model sees the image, and the patch really reaches every architecture (the vision tower of a CLIP dual encoder
included) and never stays installed."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from sentence_transformers import SentenceTransformer

from export.photos import sample_files
from harness.tiny_models import IMAGE_SIZE, LAYOUTS, PATCH, VISION_HIDDEN, VISION_LAYERS, build_tiny_clip
from tests.atman_reference import (
    _ATTENTION_NAME,
    _key,
    _model,
    content_and_factors,
    controlled_attention,
    controlled_softmax,
    image,
    image_control,
    image_factors,
    is_patched,
    minilm_path,
    reference_attention_weights,
    reference_embedding,
    reference_hidden_states,
    reference_image_attention_weights,
    reference_image_embedding,
    reference_image_hidden_states,
    special_frame,
    text,
)
from tests.tiny_models import BUILDERS, QWEN_QUERY_INSTRUCTION

# Model -> a prefix of its own (its query prompt, or none for all-MiniLM).
PREFIXES = {
    "all-minilm": "",
    "tiny-bert-cls": "query: ",
    "tiny-distilbert-max": "search_query: ",
    "tiny-qwen3": QWEN_QUERY_INSTRUCTION,
}
MODELS = sorted(PREFIXES)
SENTENCE = "The quick brown fox jumps over the lazy dog."
FOX = {"start": SENTENCE.index("fox"), "length": 3}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("atman-tiny-models")
    return {"all-minilm": minilm_path(), **{name: build(root / name) for name, build in BUILDERS.items()}}


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- the definition of the attention weights, on small tensors -------------------------------------------------------


def test_log_additive_weights_are_the_factors_times_the_softmax_numerators():
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    factors = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    allowed = torch.ones(3, 3, dtype=torch.bool)
    expected = factors * scores.exp()
    expected = expected / expected.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(controlled_softmax(scores, allowed, factors, True), expected, rtol=1e-12, atol=1e-12)


def test_multiplicative_weights_shift_each_row_by_its_minimum_over_the_attendable_keys():
    scores = torch.tensor([[1.0, 2.0, 3.0], [4.0, -1.0, 2.0], [0.5, 7.0, 9.0]], dtype=torch.float64)
    factors = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    allowed = torch.tril(torch.ones(3, 3, dtype=torch.bool))  # causal: row 2's minimum is over all three keys, row 1's over two
    # Row minima 1, -1 and 0.5; the exponentials of (s - m) * f over each row's keys.
    rows = [
        [math.exp(0.0)],
        [math.exp((4 - -1) * 1.0), math.exp(0.0 * 0.5)],
        [math.exp(0.0), math.exp(6.5 * 0.5), math.exp(8.5 * 2.0)],
    ]
    expected = torch.zeros(3, 3, dtype=torch.float64)
    for q, row in enumerate(rows):
        expected[q, : len(row)] = torch.tensor(row, dtype=torch.float64) / sum(row)
    torch.testing.assert_close(controlled_softmax(scores, allowed, factors, False), expected, rtol=1e-12, atol=1e-12)


def test_a_row_whose_attendable_keys_all_have_factor_zero_is_left_uncontrolled():
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [0.3, 0.2, 0.1]], dtype=torch.float64)
    allowed = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    factors = torch.tensor([0.0, 0.0, 4.0], dtype=torch.float64)
    weights = controlled_softmax(scores, allowed, factors, True)
    plain = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    torch.testing.assert_close(weights[:2], plain[:2], rtol=0, atol=0)  # rows 0 and 1 see only factor-0 keys
    assert weights[2, 0] == 0 and weights[2, 1] == 0 and weights[2, 2] == 1  # row 2 still has key 2
    assert not torch.isnan(weights).any()


# --- token positions and factors ------------------------------------------------------------------------------------


def test_partial_and_complete_overlap_on_a_word_split_into_wordpieces():
    # all-MiniLM splits "unbelievably" into un(0,2) ##bel(2,5) ##ie(5,7) ##va(7,9) ##bly(9,12); the span [1, 7)
    # touches un, ##bel, ##ie and covers only ##bel and ##ie. After "query: " (query, :) and [CLS], un is position 3.
    sentence = "unbelievably good"
    span = {"start": 1, "length": 6, "factor": 0.5}
    _, default = content_and_factors(minilm_path(), [text(sentence, span)], "query: ")
    ids, partial = content_and_factors(minilm_path(), [text(sentence, {**span, "token_overlap": "partial"})], "query: ")
    _, complete = content_and_factors(minilm_path(), [text(sentence, {**span, "token_overlap": "complete"})], "query: ")
    tokenizer = _model(_key(minilm_path())).tokenizer
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["[CLS]", "query", ":", "un", "##bel", "##ie", "##va", "##bly", "good", "[SEP]"]
    assert partial == [1, 1, 1, 0.5, 0.5, 0.5, 1, 1, 1, 1]
    assert complete == [1, 1, 1, 1, 0.5, 0.5, 1, 1, 1, 1]
    assert default == partial  # token_overlap defaults to partial


def test_overlapping_controls_multiply():
    sentence = "the cat saw the dog"
    controls = [{"start": 0, "length": 7, "factor": 0.5}, {"start": 4, "length": 7, "factor": 3.0}]  # the cat / cat saw
    _, factors = content_and_factors(minilm_path(), [text(sentence, *controls)])
    assert factors == [1, 0.5, 1.5, 3.0, 1, 1, 1]


def test_items_concatenate_after_the_prefix_and_token_id_controls_count_within_their_item(model_dirs):
    tokenizer = _model(_key(minilm_path())).tokenizer
    hello_world_world = tokenizer("hello world world", add_special_tokens=False)["input_ids"]
    items = [
        text("the cat"),
        {"type": "token_ids", "data": hello_world_world, "controls": [{"index": 1, "factor": 0.3}]},
        text("dog", {"start": 0, "length": 3, "factor": 2.0}),
    ]
    ids, factors = content_and_factors(minilm_path(), items, "query: ")
    assert ids == tokenizer("query: the cat hello world world dog")["input_ids"]
    assert factors == [1, 1, 1, 1, 1, 1, 0.3, 1, 2.0, 1]
    # A token id index outside its item is refused rather than silently ignored.
    with pytest.raises(ValueError, match="outside"):
        content_and_factors(minilm_path(), [{"type": "token_ids", "data": [7592], "controls": [{"index": 1, "factor": 0.3}]}], "")


def test_the_decoder_frame_is_a_trailing_end_of_sequence_that_is_never_controlled(model_dirs):
    qwen = model_dirs["tiny-qwen3"]
    tokenizer = _model(_key(qwen)).tokenizer
    assert special_frame(tokenizer) == ([], [tokenizer.eos_token_id])
    ids, factors = content_and_factors(qwen, [text("the cat", {"start": 0, "length": 7, "factor": 0.0})])
    assert ids == tokenizer("the cat")["input_ids"]
    assert factors[-1] == 1 and set(factors[:-1]) == {0.0}


def test_the_contextual_threshold_spreads_a_control_to_a_repeated_token_only():
    sentence = "the cat saw the dog"
    first_the = {"start": 0, "length": 3, "factor": 0.5}
    _, alone = content_and_factors(minilm_path(), [text(sentence, first_the)])
    _, spread = content_and_factors(minilm_path(), [text(sentence, first_the)], threshold=0.99)
    assert alone == [1, 0.5, 1, 1, 1, 1, 1]
    assert spread == [1, 0.5, 1, 1, 0.5, 1, 1]  # the second "the" (cosine 1), not cat/saw/dog nor the special tokens
    # A control reaching a position both explicitly and contextually still applies once.
    _, once = content_and_factors(minilm_path(), [text(sentence, {"start": 0, "length": 15, "factor": 0.5})], threshold=0.99)
    assert once == [1, 0.5, 0.5, 0.5, 0.5, 1, 1]
    # A threshold of -1 reaches every content position, still never the special tokens.
    _, everywhere = content_and_factors(minilm_path(), [text(sentence, first_the)], threshold=-1.0)
    assert everywhere == [1, 0.5, 0.5, 0.5, 0.5, 0.5, 1]


# --- the patched models ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def plain_models(model_dirs):
    return {name: SentenceTransformer(str(path), device="cpu") for name, path in model_dirs.items()}


@pytest.mark.parametrize("name", MODELS)
def test_without_effective_controls_it_is_sentence_transformers(name, model_dirs, plain_models):
    path, prefix, plain = model_dirs[name], PREFIXES[name], plain_models[name]
    expected = plain.encode(SENTENCE, prompt=prefix)
    ids, _ = content_and_factors(path, [text(SENTENCE)], prefix)
    assert ids == plain[0].preprocess([prefix + SENTENCE])["input_ids"][0].tolist()
    for log_additive in (True, False):
        # A control of factor 1 is present but neutral, in both modes.
        vector = reference_embedding(path, [text(SENTENCE, {**FOX, "factor": 1.0})], prefix, log_additive=log_additive)
        assert vector.dtype == np.float64
        assert cosine(vector, expected) >= 0.999999, (name, log_additive)
    assert not is_patched(_model(_key(path)))


@pytest.mark.parametrize("name", MODELS)
def test_a_different_factor_changes_the_vector(name, model_dirs):
    path, prefix = model_dirs[name], PREFIXES[name]
    uncontrolled = reference_embedding(path, [text(SENTENCE)], prefix)
    for log_additive, factor in ((True, 0.1), (True, 5.0), (False, 0.1), (False, 3.0)):
        vector = reference_embedding(path, [text(SENTENCE, {**FOX, "factor": factor})], prefix, log_additive=log_additive)
        assert cosine(vector, uncontrolled) < 0.99999, (name, log_additive, factor)


@pytest.mark.parametrize("name", MODELS)
def test_factor_zero_removes_a_key_from_every_layer_and_head(name, model_dirs):
    path, prefix = model_dirs[name], PREFIXES[name]
    items = [text(SENTENCE, {**FOX, "factor": 0.0})]
    _, factors = content_and_factors(path, items, prefix)
    zeroed = [i for i, f in enumerate(factors) if f == 0]
    assert zeroed and zeroed[0] > 0  # a key that some row attends next to others (also causally)
    layers = reference_attention_weights(path, items, prefix)
    assert len(layers) == _model(_key(path))[0].auto_model.config.num_hidden_layers
    for weights in layers:
        assert weights.shape[1:] == (len(factors), len(factors))
        assert (weights[:, :, zeroed] == 0).all()
        np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
        others = [k for k in range(len(factors)) if k not in zeroed]
        # Every other key keeps a positive weight where the query may attend it.
        assert (weights[:, zeroed[-1] + 1 :, others] > 0).any()


def test_a_decoder_row_that_sees_only_factor_zero_keys_is_left_uncontrolled(model_dirs):
    # In the decoder, query 1 attends keys 0 and 1 only; with both at factor 0 its row, and so its hidden state in
    # every layer, is the uncontrolled one, while later positions (which also see factor-1 keys) do change.
    qwen = model_dirs["tiny-qwen3"]
    zero_first_two = [{"index": 0, "factor": 0.0}, {"index": 1, "factor": 0.0}]
    items = [{"type": "token_ids", "data": [300, 301, 302, 303, 304], "controls": zero_first_two}]
    plain_items = [{"type": "token_ids", "data": [300, 301, 302, 303, 304]}]
    assert content_and_factors(qwen, items, "")[1] == [0.0, 0.0, 1, 1, 1, 1]
    controlled, plain = reference_hidden_states(qwen, items), reference_hidden_states(qwen, plain_items)
    assert controlled.shape == plain.shape == (3, 6, 192)
    np.testing.assert_allclose(controlled[:, :2], plain[:, :2], rtol=0, atol=1e-12)
    assert not np.allclose(controlled[1:, 2:], plain[1:, 2:], rtol=0, atol=1e-6)
    for weights, plain_weights in zip(reference_attention_weights(qwen, items), reference_attention_weights(qwen, plain_items)):
        np.testing.assert_allclose(weights[:, :2], plain_weights[:, :2], rtol=0, atol=1e-12)
        assert (weights[:, 2:, :2] == 0).all()


def test_hidden_states_start_with_the_embeddings_and_end_with_the_token_embeddings(model_dirs):
    path = model_dirs["tiny-bert-cls"]
    hidden = reference_hidden_states(path, [text(SENTENCE)], "query: ")
    model = _model(_key(path))
    ids, _ = content_and_factors(path, [text(SENTENCE)], "query: ")
    with torch.inference_mode():
        embeddings = model[0].auto_model.embeddings(input_ids=torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(hidden[0], embeddings, rtol=0, atol=1e-12)
    assert hidden.shape == (3, len(ids), 192)


def test_the_patch_is_scoped_to_its_block_even_on_an_error(model_dirs):
    for name in ("all-minilm", "tiny-distilbert-max", "tiny-qwen3"):
        model = _model(_key(model_dirs[name]))
        with pytest.raises(RuntimeError, match="inside"):
            with controlled_attention(model, [1.0, 1.0], True):
                assert is_patched(model)
                raise RuntimeError("inside")
        assert not is_patched(model)


# --- images: the vision tower of a CLIP dual encoder ----------------------------------------------------------------

# Patches per side of the tiny CLIP's vision tower; its sequence is the class token, then GRID * GRID patches.
GRID = IMAGE_SIZE // PATCH
TOKENS = 1 + GRID * GRID


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("atman-tiny-clip")
    return {layout: build_tiny_clip(root / layout, layout) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def photos():
    return sample_files()


def png(width: int, height: int) -> bytes:
    """A PNG of random colours: something for the model to see (the factors depend on the image's size only)."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def patch_grid(factors: np.ndarray) -> np.ndarray:
    """The patches' factors as the GRID x GRID grid they tile, after checking the class token is uncontrolled."""
    assert factors.shape == (TOKENS,) and factors.dtype == np.float64
    assert factors[0] == 1
    return factors[1:].reshape(GRID, GRID)


def upright(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_image_without_effective_controls_is_sentence_transformers(layout, clip_dirs, photos):
    path = clip_dirs[layout]
    plain = SentenceTransformer(str(path), device="cpu")
    chelsea, turned = photos["chelsea-RGB.jpeg"], photos["coffee-RGB-300x200-exif6.jpeg"]
    assert upright(chelsea).size == (451, 300) and upright(turned).size == (200, 300)
    cases = [
        (chelsea, {}, upright(chelsea)),  # wide: resized, then its sides cut by the center crop
        (chelsea, {"x": 100, "y": 40, "size": 220}, upright(chelsea).crop((100, 40, 320, 260))),
        (turned, {}, upright(turned)),  # stored on its side: the vector is the upright photo's
    ]
    neutral = [image_control(0.2, 0.1, 0.5, 0.6, 1.0), image_control(0, 0, 1, 1, 1.0, "complete")]
    for data, crop, seen in cases:
        expected = plain.encode(seen)
        vector = reference_image_embedding(path, image(data, **crop))
        assert vector.dtype == np.float64 and vector.shape == expected.shape
        assert cosine(vector, expected) >= 0.99999, crop
        for log_additive in (True, False):
            # Controls of factor 1 are present but neutral, in both modes.
            vector = reference_image_embedding(path, image(data, *neutral, **crop), log_additive=log_additive)
            assert cosine(vector, expected) >= 0.99999, (crop, log_additive)
    # The orientation matters: the photo as stored is another vector.
    assert cosine(reference_image_embedding(path, image(turned)), plain.encode(Image.open(io.BytesIO(turned)))) < 0.9999
    assert not is_patched(_model(_key(path)))


def test_image_hidden_states_are_the_vision_towers_and_lead_to_the_vector(clip_dirs, photos):
    path = clip_dirs["transformer"]
    data = photos["chelsea-RGB.jpeg"]
    item = image(data, image_control(0.3, 0.2, 0.4, 0.5, 0.2))
    hidden, plain = reference_image_hidden_states(path, item), reference_image_hidden_states(path, image(data))
    assert hidden.shape == (VISION_LAYERS + 1, TOKENS, VISION_HIDDEN)
    # The embeddings (layer 0) come before any attention; every layer after it is controlled.
    np.testing.assert_array_equal(hidden[0], plain[0])
    assert all(not np.allclose(hidden[i], plain[i], rtol=0, atol=1e-6) for i in range(1, VISION_LAYERS + 1))
    # The class token of the last layer, through CLIP's post-layernorm and projection, is the vector.
    clip = _model(_key(path))[0].auto_model
    with torch.inference_mode():
        projected = clip.visual_projection(clip.vision_model.post_layernorm(torch.from_numpy(hidden[-1, 0])))
    np.testing.assert_allclose(projected.numpy(), reference_image_embedding(path, item), rtol=0, atol=1e-12)


def test_a_rect_over_the_whole_image_reaches_every_patch_but_never_the_class_token(clip_dirs, photos):
    factors = image_factors(clip_dirs["transformer"], image(photos["chelsea-RGB.jpeg"], image_control(0, 0, 1, 1, 2.0)))
    np.testing.assert_allclose(patch_grid(factors), 2.0, rtol=0, atol=1e-6)


def test_rects_resolve_to_the_patches_they_cover_on_a_square_image(clip_dirs):
    # 64 x 64 is resized to the model's 32 x 32, so each 8 x 8 patch is a 16 x 16 block of the image.
    path, square = clip_dirs["transformer"], png(64, 64)
    left_half = patch_grid(image_factors(path, image(square, image_control(0, 0, 0.5, 1, 3.0))))
    np.testing.assert_allclose(left_half, [[3, 3, 1, 1]] * GRID, rtol=0, atol=1e-6)

    # A quarter of the patch in row 1, column 2 (image pixels x 32..48, y 16..32): its top-left 8 x 8 pixels.
    quarter = (32 / 64, 16 / 64, 8 / 64, 8 / 64)
    expected = np.ones((GRID, GRID))
    for overlap, there in ((None, 1 + (0.2 - 1) / 4), ("partial", 1 + (0.2 - 1) / 4), ("complete", 0.2)):
        expected[1, 2] = there
        factors = image_factors(path, image(square, image_control(*quarter, 0.2, overlap)))
        np.testing.assert_allclose(patch_grid(factors), expected, rtol=0, atol=1e-6, err_msg=str(overlap))


def test_only_what_the_center_crop_keeps_is_controlled(clip_dirs):
    # 131 x 32 keeps its size through the resize (shortest edge 32); the center crop keeps x 49..81, (131 - 32) // 2
    # being 49 (a crop that rounded the odd margin up would start at 50).
    path, wide = clip_dirs["transformer"], png(131, 32)
    for overlap in ("partial", "complete"):
        strip = image_factors(path, image(wide, image_control(0, 0, 0.25, 1, 0.0, overlap)))  # x 0..33: cut away
        np.testing.assert_array_equal(patch_grid(strip), np.ones((GRID, GRID)))
    first_column = patch_grid(image_factors(path, image(wide, image_control(49 / 131, 0, 8 / 131, 1, 5.0))))
    np.testing.assert_allclose(first_column, [[5, 1, 1, 1]] * GRID, rtol=0, atol=1e-6)
    # x 45..53: only its part from 49 on is seen, half of the first column's patches.
    straddling = patch_grid(image_factors(path, image(wide, image_control(45 / 131, 0, 8 / 131, 1, 5.0))))
    np.testing.assert_allclose(straddling, [[3, 1, 1, 1]] * GRID, rtol=0, atol=1e-6)


def test_overlapping_image_controls_multiply_up_to_the_cap(clip_dirs):
    path, square = clip_dirs["transformer"], png(64, 64)
    left, top = image_control(0, 0, 0.5, 1, 2.0), image_control(0, 0, 1, 0.5, 3.0)
    expected = [[6, 6, 3, 3], [6, 6, 3, 3], [2, 2, 1, 1], [2, 2, 1, 1]]
    np.testing.assert_allclose(patch_grid(image_factors(path, image(square, left, top))), expected, rtol=1e-6, atol=0)
    huge = image_control(0, 0, 1, 1, 1e20, "complete")
    np.testing.assert_array_equal(patch_grid(image_factors(path, image(square, huge, huge))), np.full((GRID, GRID), 1e30))


def test_with_a_crop_the_rect_still_refers_to_the_whole_image(clip_dirs):
    # 128 x 64; the crop keeps its right half, x 64..128, which the model sees as its whole square.
    path, wide = clip_dirs["transformer"], png(128, 64)
    crop = {"x": 64, "y": 0, "size": 64}
    rect = image_control(0.5, 0, 0.25, 1, 4.0)  # x 64..96 of the whole image
    np.testing.assert_allclose(patch_grid(image_factors(path, image(wide, rect, **crop))), [[4, 4, 1, 1]] * GRID, atol=1e-6)
    # Uncropped, the model sees x 32..96 (resized to 64 x 32, center crop 16..48), so the same rect is its right half.
    np.testing.assert_allclose(patch_grid(image_factors(path, image(wide, rect))), [[1, 1, 4, 4]] * GRID, atol=1e-6)
    # A rect over the part the item's crop removes reaches nothing.
    cut_away = image_control(0, 0, 0.5, 1, 0.0, "complete")
    np.testing.assert_array_equal(patch_grid(image_factors(path, image(wide, cut_away, **crop))), np.ones((GRID, GRID)))


def test_a_rect_refers_to_the_upright_image(clip_dirs, photos):
    path, turned = clip_dirs["transformer"], photos["coffee-RGB-300x200-exif6.jpeg"]
    as_stored = Image.open(io.BytesIO(turned)).convert("RGB")
    assert as_stored.size == (300, 200)

    def factors_of(img: Image.Image, control: dict) -> np.ndarray:
        out = io.BytesIO()
        img.save(out, format="PNG")
        return image_factors(path, image(out.getvalue(), control))

    control = image_control(0.1, 0.6, 0.3, 0.3, 0.5)
    factors = image_factors(path, image(turned, control))
    assert (factors != 1).any()
    np.testing.assert_array_equal(factors, factors_of(upright(turned), control))
    assert not np.allclose(factors, factors_of(as_stored, control))


def test_image_items_are_refused_when_malformed(clip_dirs):
    path, square = clip_dirs["transformer"], png(64, 64)
    with pytest.raises(ValueError, match="all three or none"):
        image_factors(path, image(square, x=0, y=0))
    with pytest.raises(ValueError, match="token_overlap"):
        image_factors(path, image(square, image_control(0, 0, 1, 1, 2.0, "most")))


def test_factor_zero_removes_the_patches_it_covers_from_every_vision_layer_and_head(clip_dirs):
    path, square = clip_dirs["transformer"], png(64, 64)
    item = image(square, image_control(0, 0, 0.5, 0.5, 0.0))  # the top-left 2 x 2 patches
    zeroed = np.flatnonzero(image_factors(path, item) == 0)
    assert zeroed.tolist() == [1, 2, 5, 6]
    others = [k for k in range(TOKENS) if k not in zeroed]
    layers = reference_image_attention_weights(path, item)
    heads = _model(_key(path))[0].auto_model.config.vision_config.num_attention_heads
    assert len(layers) == VISION_LAYERS
    for weights in layers:
        assert weights.shape == (heads, TOKENS, TOKENS)
        assert (weights[:, :, zeroed] == 0).all()
        assert (weights[:, :, others] > 0).all()
        np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    uncontrolled = reference_image_embedding(path, image(square))
    assert cosine(reference_image_embedding(path, item), uncontrolled) < 0.99999


def test_both_modes_change_an_image_vector_and_differently(clip_dirs):
    path, square = clip_dirs["transformer"], png(64, 64)
    uncontrolled = reference_image_embedding(path, image(square))
    for factor in (0.1, 3.0):
        item = image(square, image_control(0.25, 0.25, 0.5, 0.5, factor))
        additive = reference_image_embedding(path, item, log_additive=True)
        multiplicative = reference_image_embedding(path, item, log_additive=False)
        assert cosine(additive, uncontrolled) < 0.99999 and cosine(multiplicative, uncontrolled) < 0.99999, factor
        assert cosine(additive, multiplicative) < 0.99999, factor


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_vision_patch_reaches_the_vision_tower_only_and_is_scoped_to_its_block(layout, clip_dirs):
    path = clip_dirs[layout]
    model = _model(_key(path))
    clip = model[0].auto_model
    reference_image_embedding(path, image(png(64, 64), image_control(0, 0, 0.5, 0.5, 0.0)))
    assert not is_patched(model)
    with pytest.raises(RuntimeError, match="inside"):
        with controlled_attention(model, [1.0] * TOKENS, True):
            assert is_patched(model)
            assert clip.vision_model.config._attn_implementation == _ATTENTION_NAME
            assert clip.text_model.config._attn_implementation == "eager"
            raise RuntimeError("inside")
    assert not is_patched(model)
    # An error raised by the controlled attention itself (factors for another number of tokens) leaves nothing either.
    pixels = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected one prompt of 5 tokens"):
        with torch.inference_mode(), controlled_attention(model, [1.0] * 5, True):
            clip.vision_model(pixel_values=pixels)
    assert not is_patched(model)

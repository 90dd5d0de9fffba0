"""Attention controls in the gateway: spans to positions through the tokenizer's offsets, products, contextual
spreading, and the 400s that name the field."""

import numpy as np
import pytest

from gateway.core.controls import (
    MAX_POSITION_FACTOR,
    PositionControl,
    TextControl,
    TokenControl,
    TokenSimilarity,
    position_factors,
)
from gateway.core.errors import ServiceError
from gateway.core.prompts import PromptItem, resolve


def pieces(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.id_to_token(i) for i in ids]


def test_partial_overlap_takes_every_wordpiece_the_span_touches_and_complete_only_those_inside(tokenizer):
    text = "the snowboarding tall tower"
    encoding = tokenizer.encode(text, add_special_tokens=False)
    assert encoding.tokens[:4] == ["the", "snow", "##boarding", "tall"]
    # "owboarding tall" starts inside "snow", so it touches both wordpieces but holds only "##boarding" (and "tall") whole.
    start, length = text.index("owboarding"), len("owboarding tall")
    partial = resolve([PromptItem("text", text, (TextControl(start, length, 0.5),))], tokenizer, "", "prompt")
    complete = resolve([PromptItem("text", text, (TextControl(start, length, 0.5, "complete"),))], tokenizer, "", "prompt")
    assert partial.token_ids == complete.token_ids == encoding.ids
    assert partial.controls == (PositionControl((1, 2, 3), 0.5),)
    assert complete.controls == (PositionControl((2, 3), 0.5),)


def test_controls_follow_their_items_to_positions_in_the_joined_sequence_after_the_prefix(tokenizer):
    prefix_ids = tokenizer.encode("query: ", add_special_tokens=False).ids
    first = tokenizer.encode("a dog", add_special_tokens=False).ids
    items = [
        PromptItem("text", "a dog", (TextControl(2, 3, 0.0),)),
        PromptItem("token_ids", [2003, 2770], (TokenControl(1, 10.0),)),
    ]
    prompt = resolve(items, tokenizer, "query: ", "prompt")
    assert prompt.token_ids == prefix_ids + first + [2003, 2770]
    assert prompt.controls == (
        PositionControl((len(prefix_ids) + 1,), 0.0),
        PositionControl((len(prefix_ids) + len(first) + 1,), 10.0),
    )


def test_a_single_controlled_text_is_tokenized_with_its_prefix_like_the_uncontrolled_one(tokenizer):
    prompt = resolve([PromptItem("text", "dogs run", (TextControl(0, 4, 2.0),))], tokenizer, "query: ", "prompt")
    assert prompt.token_ids == tokenizer.encode("query: dogs run", add_special_tokens=False).ids
    dogs = tokenizer.encode("query: dogs run", add_special_tokens=False).tokens.index("dogs")
    assert prompt.controls == (PositionControl((dogs,), 2.0),)


def test_uncontrolled_prompts_keep_their_fast_paths(tokenizer):
    assert resolve([PromptItem("text", "dogs run")], tokenizer, "", "prompt").controls is None
    assert resolve([PromptItem("token_ids", [2003]), PromptItem("text", "x")], tokenizer, "", "prompt").controls is None


def test_a_position_controlled_twice_gets_the_product():
    factors = position_factors([5, 6, 7], [PositionControl((0, 1), 0.5), PositionControl((1,), 4.0)], None, None)
    assert factors.tolist() == [0.5, 2.0, 1.0]


def test_products_are_capped_so_that_scores_stay_finite():
    factors = position_factors([5], [PositionControl((0,), 1e30), PositionControl((0,), 1e30)], None, None)
    assert factors.tolist() == [np.float32(MAX_POSITION_FACTOR)]


def test_a_contextual_threshold_spreads_a_control_to_similar_tokens_only(tmp_path):
    # Token 0 and 2 point the same way (cosine 1), token 1 is orthogonal, token 3 is at cosine 0.6 to token 0.
    matrix = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    np.save(tmp_path / "e.npy", matrix)
    similarity = TokenSimilarity(tmp_path / "e.npy")
    control = [PositionControl((0,), 0.0)]
    assert position_factors([0, 1, 2, 3], control, None, similarity).tolist() == [0, 1, 1, 1]
    assert position_factors([0, 1, 2, 3], control, 0.99, similarity).tolist() == [0, 1, 0, 1]
    assert position_factors([0, 1, 2, 3], control, 0.5, similarity).tolist() == [0, 1, 0, 0]
    # Each control reaches a position once: the repeated token is not multiplied twice.
    assert position_factors([0, 2], [PositionControl((0, 1), 3.0)], 0.5, similarity).tolist() == [3.0, 3.0]


@pytest.mark.parametrize(
    ("item", "field", "says"),
    [
        (PromptItem("text", "hi", (TextControl(1, 2, 1.0),)), "prompt.controls.start", "[1, 3) is outside its text of 2"),
        (PromptItem("text", "hi", (TextControl(0, -1, 1.0),)), "prompt.controls.start", "outside"),
        (PromptItem("text", "hi", (TextControl(0, 1, -1.0),)), "prompt.controls.factor", ">= 0"),
        (PromptItem("text", "hi", (TextControl(0, 1, float("nan")),)), "prompt.controls.factor", "finite"),
        (PromptItem("text", "hi", (TextControl(0, 1, float("inf")),)), "prompt.controls.factor", "finite"),
        (PromptItem("text", "hi", (TextControl(0, 1, 1.0, "most"),)), "prompt.controls.token_overlap", "'most'"),
        (PromptItem("token_ids", [1, 2], (TokenControl(2, 1.0),)), "prompt.controls.index", "index 2 is outside its item of 2"),
        (PromptItem("token_ids", [1, 2], (TokenControl(-1, 1.0),)), "prompt.controls.index", "outside"),
    ],
)
def test_invalid_controls_are_refused_naming_the_field(tokenizer, item, field, says):
    with pytest.raises(ServiceError) as error:
        resolve([item], tokenizer, "", "prompt")
    assert error.value.param == field
    assert says in error.value.message

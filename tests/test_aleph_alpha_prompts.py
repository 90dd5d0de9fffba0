"""Prompt resolution: items concatenate in order, the representation's prefix goes first, refusals say why."""

import pytest

from gateway.core.errors import ServiceError
from gateway.core.prompts import Prompt, PromptItem, resolve


def test_single_text_keeps_the_tokenizer_step_and_gets_the_prefix(tokenizer):
    prompt = resolve([PromptItem("text", "what is triton?")], tokenizer, "query: ", "prompt")
    assert prompt == Prompt(text="query: what is triton?")


def test_items_concatenate_in_order_after_the_prefix(tokenizer):
    ids = tokenizer.encode("guitar", add_special_tokens=False).ids
    items = [PromptItem("text", "a man plays"), PromptItem("token_ids", ids), PromptItem("text", "loudly")]
    prompt = resolve(items, tokenizer, "passage: ", "prompt")
    assert prompt.token_ids == tokenizer.encode("passage: a man plays guitar loudly", add_special_tokens=False).ids


@pytest.mark.parametrize(
    ("items", "says"),
    [
        ([PromptItem("image", "iVBORw0KGgo=")], "'prompts[3]': this model does not accept images"),
        ([PromptItem("token_ids", [101, 10**9])], "'prompts[3]' holds token id 1000000000"),
        ([PromptItem("token_ids", [])], "'prompts[3]' must not be empty"),
        ([], "'prompts[3]' must not be empty"),
    ],
)
def test_refusals_name_the_prompt(tokenizer, items, says):
    with pytest.raises(ServiceError) as error:
        resolve(items, tokenizer, "", "prompts", 3)
    assert error.value.param == "prompts"
    assert says in error.value.message

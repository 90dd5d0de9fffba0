"""Prompt tokens metered before the work: each inference reserves its prompts' tokens from the caller's
tokens-per-minute budget (the request context's, set by gateway.auth when the caller's token has that limit).

Prompt tokens are counted exactly only by Triton's tokenizer step, after the work, so the reservation is an estimate
from the prompts' UTF-8 length (at least the count of the WordPiece and byte-level BPE tokenizers served here, bar
rare normalizations), or, when the estimate does not fit, the exact count from the model's own tokenizer. A request
that cannot fit now is refused with 429 and the seconds until it can, one that never can (more than a minute's
limit) with 413.
"""

from __future__ import annotations

import asyncio

from tokenizers import Tokenizer

from gateway.core.catalog import ServedModel
from gateway.core.errors import ErrorKind, ServiceError, rate_limited
from gateway.core.prompts import Prompt, encode
from gateway.ops import request_context
from gateway.ops.request_context import Settlement


class _Unmetered:
    """What an inference holds when its caller's token has no limit on tokens: nothing to settle."""

    def settle(self, used: int) -> None:
        pass


UNMETERED = _Unmetered()


def _image_tokens(model: ServedModel) -> int:
    """What an image counts as: the model's image tokens (patches and the class token)."""
    return model.vision.image_tokens if model.vision is not None else 0


def _estimate(prompt: Prompt, specials: int, max_tokens: int, image_tokens: int) -> int:
    """Exact for token ids and images. For a text its UTF-8 length: a token of the WordPiece and byte-level BPE
    tokenizers served here spans at least a byte, bar rare normalizations, which the settlement after the inference
    makes up for."""
    if prompt.image is not None:
        return image_tokens
    if prompt.token_ids is not None:
        length = len(prompt.token_ids)
    else:
        assert prompt.text is not None  # a prompt without token ids has a text (see Prompt)
        length = len(prompt.text.encode())
    return min(max_tokens, length + specials)


def _exact_count(
    tokenizer: Tokenizer, prompts: list[Prompt], specials: int, max_tokens: int, max_chars: int, ceiling: int, image_tokens: int
) -> int | None:
    """The prompts' tokens as Triton's tokenizer step counts them (at most max_tokens each), or None as soon as they
    pass `ceiling`: beyond it the exact number does not matter, and a huge request is not tokenized to the end."""
    total = 0
    for prompt in prompts:
        if prompt.image is not None:
            total += image_tokens
        elif prompt.token_ids is not None:
            total += min(max_tokens, len(prompt.token_ids) + specials)
        else:
            assert prompt.text is not None  # a prompt without token ids has a text (see Prompt)
            # Longer texts are cut to max_chars or refused before inference: tokenizing the rest would be wasted.
            total += min(max_tokens, len(encode(tokenizer, prompt.text[:max_chars]).ids) + specials)
        if total > ceiling:
            return None
    return total


async def reserve_prompt_tokens(model: ServedModel, prompts: list[Prompt], field: str, max_chars: int) -> Settlement:
    """Holds the prompts' tokens in the caller's tokens-per-minute bucket before any work is done for them; the
    caller settles the reservation with the tokens the inference used. Raises RATE_LIMITED (429) when they do not fit
    now, PAYLOAD_TOO_LARGE (413) when they never can."""
    context = request_context.current()
    if context is None or context.token_budget is None:
        return UNMETERED
    budget = context.token_budget
    tokenizer, max_tokens, specials = model.tokenizer, model.max_sequence_length, model.special_tokens
    image_tokens = _image_tokens(model)
    reservation = budget.try_reserve(sum(_estimate(prompt, specials, max_tokens, image_tokens) for prompt in prompts))
    if reservation is not None:
        return reservation
    # The estimate runs 3 to 5 times over for English; the exact count is worth its cost only when the estimate is
    # refused, and counting in a thread keeps the event loop serving others meanwhile.
    limit = budget.tokens_per_minute
    exact = await asyncio.to_thread(_exact_count, tokenizer, prompts, specials, max_tokens, max_chars, limit, image_tokens)
    if exact is None:
        raise ServiceError(
            ErrorKind.PAYLOAD_TOO_LARGE,
            f"'{field}' holds more than the {limit} prompt tokens a minute that this token may use, "
            "so it can never be served whole; send it in smaller requests",
            field,
        )
    reservation = budget.try_reserve(exact)
    if reservation is None:
        raise rate_limited(f"rate limit of {limit} tokens per minute exceeded", budget.wait_s(exact))
    return reservation

"""Tokenizing on a request path: other threads (the event loop among them) keep running, and texts no model reads
are refused before they cost anything."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from bench.workload import sentences
from gateway.core.catalog import Catalog
from gateway.core.errors import ServiceError
from gateway.core.prompts import PromptItem, decode, encode, resolve
from gateway.core.scheduler import Scheduler
from gateway.core.service import MAX_CHARS_PER_TOKEN, EmbeddingService
from gateway.triton.pool import TritonPool
from harness.servers import MODEL_REPOSITORY

TICK_S = 0.01
# Long enough to take seconds to tokenize (about a microsecond a character on these machines).
HUGE_CHARS = 3_000_000


@pytest.fixture(scope="module")
def huge_text() -> str:
    text = " ".join(sentences())
    return (text * (HUGE_CHARS // len(text) + 1))[:HUGE_CHARS]


def longest_pause_while(work) -> tuple[float, float]:
    """(seconds `work` took, longest interval between the wake-ups of a thread that sleeps TICK_S at a time)."""
    started, done = threading.Event(), threading.Event()
    gaps: list[float] = []

    def tick() -> None:
        last = time.perf_counter()
        started.set()
        while not done.is_set():
            time.sleep(TICK_S)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    started.wait()
    begin = time.perf_counter()
    try:
        work()
    finally:
        took = time.perf_counter() - begin
        done.set()
        ticker.join()
    return took, max(gaps)


def assert_ticker_kept_ticking(took: float, longest: float) -> None:
    # Holding the GIL for the whole call would stall the ticker for all of `took`. A quarter of it leaves room for a
    # busy shared machine descheduling the ticker now and then.
    assert took > 0.3, f"the work took only {took:.2f} s, too little to tell"
    assert longest < took / 4, f"the ticker stalled for {longest:.2f} s of the {took:.2f} s the work took"


def test_encoding_megabytes_leaves_other_threads_running(tokenizer, huge_text):
    took, longest = longest_pause_while(lambda: encode(tokenizer, huge_text))
    print(f"encode of {len(huge_text)} characters: {took:.2f} s, longest tick gap {longest * 1000:.0f} ms")
    assert_ticker_kept_ticking(took, longest)


def test_decoding_a_million_ids_leaves_other_threads_running(tokenizer, huge_text):
    ids = encode(tokenizer, huge_text).ids
    took, longest = longest_pause_while(lambda: decode(tokenizer, ids))
    print(f"decode of {len(ids)} ids: {took:.2f} s, longest tick gap {longest * 1000:.0f} ms")
    assert_ticker_kept_ticking(took, longest)


def test_encode_and_decode_give_what_the_tokenizer_gives(tokenizer):
    text = "Hello world, the cat sits outside. Naïve café déjà vu."
    expected = tokenizer.encode(text, add_special_tokens=False)
    got = encode(tokenizer, text)
    assert (got.ids, got.tokens, got.offsets) == (expected.ids, expected.tokens, expected.offsets)
    assert decode(tokenizer, expected.ids) == tokenizer.decode(expected.ids)


@pytest.fixture(scope="module")
def embedding_service() -> EmbeddingService:
    async def no_triton(*args):
        raise AssertionError("tokenization must not reach Triton")

    scheduler = Scheduler(TritonPool([]), no_triton, max_pending_texts=10, max_rows_in_flight=10, max_calls_per_lane=1)
    return EmbeddingService(Catalog.from_repository(MODEL_REPOSITORY), scheduler, max_inputs=2048, truncate=False, timeout_s=5)


def limit_of(service: EmbeddingService, model_name: str) -> int:
    return service.catalog.get(model_name).max_sequence_length * MAX_CHARS_PER_TOKEN


def test_tokenize_takes_the_longest_prompt_and_refuses_one_more_character(embedding_service, model_name):
    limit = limit_of(embedding_service, model_name)
    tokens, ids = asyncio.run(embedding_service.tokenize(model_name, "a" * limit))
    assert len(tokens) == len(ids) > 0
    with pytest.raises(ServiceError) as error:
        asyncio.run(embedding_service.tokenize(model_name, "a" * (limit + 1)))
    assert error.value.param == "prompt"
    assert f"{limit + 1} characters, more than the model can read ({limit})" in error.value.message


def test_detokenize_refuses_more_ids_than_the_longest_prompt_has_characters(embedding_service, model_name, tokenizer):
    limit = limit_of(embedding_service, model_name)
    word = tokenizer.token_to_id("cat")
    assert asyncio.run(embedding_service.detokenize(model_name, [word] * 3)) == "cat cat cat"
    with pytest.raises(ServiceError) as error:
        asyncio.run(embedding_service.detokenize(model_name, [word] * (limit + 1)))
    assert error.value.param == "token_ids"
    assert f"holds {limit + 1} token ids, more than {limit}" in error.value.message


def test_a_prompts_texts_count_together_against_the_limit(tokenizer):
    # Each item alone is within the limit; together they are one model input, and over it.
    items = [PromptItem("text", "a" * 60), PromptItem("token_ids", [101]), PromptItem("text", "b" * 41)]
    with pytest.raises(ServiceError) as error:
        resolve(items, tokenizer, "", "prompt", max_chars=100)
    assert error.value.param == "prompt"
    assert "holds 101 characters, more than the model can read (100)" in error.value.message
    # The representation's prefix is part of the input too: 3 + 50 + 48 characters.
    with pytest.raises(ServiceError) as error:
        resolve([PromptItem("text", "a" * 50), PromptItem("text", "b" * 48)], tokenizer, "q: ", "prompt", max_chars=100)
    assert "holds 101 characters" in error.value.message
    assert resolve(items[:2], tokenizer, "", "prompt", max_chars=100).token_ids[-1] == 101

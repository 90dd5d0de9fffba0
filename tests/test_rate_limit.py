"""The per-token rate limiter and the login throttle on a controlled clock: what is admitted, when, and the Retry-After
they compute; prompt tokens reserved with the model's real tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gateway.auth.rate_limit import LoginThrottle, RateLimiter, address_key
from gateway.auth.store import Limits
from gateway.core.errors import ErrorKind, ServiceError
from gateway.core.images import ImageInput
from gateway.core.metering import UNMETERED, reserve_prompt_tokens
from gateway.core.prompts import Prompt
from gateway.ops import request_context
from gateway.ops.request_context import RequestContext
from gateway.transports.http.status import http_status


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refused(limiter: RateLimiter, token_id: int, limits: Limits) -> ServiceError:
    with pytest.raises(ServiceError) as raised:
        limiter.admit(token_id, limits)
    assert raised.value.kind is ErrorKind.RATE_LIMITED and http_status(raised.value) == 429
    return raised.value


def test_unlimited_tokens_are_always_admitted():
    limiter = RateLimiter(Clock())
    for _ in range(10_000):
        limiter.admit(1, Limits())


def test_requests_per_second_allow_a_one_second_burst_then_refill():
    clock, limits = Clock(), Limits(requests_per_second=5)
    limiter = RateLimiter(clock)
    for _ in range(5):
        limiter.admit(1, limits)
    assert refused(limiter, 1, limits).retry_after_s == 1
    clock.now += 0.2  # one request's worth
    limiter.admit(1, limits)
    assert refused(limiter, 1, limits)
    limiter.admit(2, limits)  # another token has its own bucket


def test_a_slow_rate_says_how_long_to_wait():
    clock, limits = Clock(), Limits(requests_per_second=0.25)
    limiter = RateLimiter(clock)
    limiter.admit(1, limits)
    assert refused(limiter, 1, limits).retry_after_s == 4
    clock.now += 3.0
    assert refused(limiter, 1, limits).retry_after_s == 1
    clock.now += 1.0
    limiter.admit(1, limits)


def test_tokens_per_minute_are_reserved_before_the_work_and_settled_to_what_was_used():
    clock, limits = Clock(), Limits(tokens_per_minute=600)  # 10 tokens a second
    limiter = RateLimiter(clock)
    budget = limiter.admit(1, limits)
    held = budget.try_reserve(500)
    assert budget.try_reserve(101) is None  # 100 left while 500 are held: no burst past the bucket
    held.settle(200)  # the request used 200 of its 500
    assert budget.try_reserve(400) is not None and budget.try_reserve(1) is None
    error = refused(limiter, 1, limits)  # nothing left: refused at admission, before any work
    assert error.retry_after_s == 1 and "600 tokens per minute" in error.message
    clock.now += 1.0
    assert limiter.admit(1, limits) is not None


def test_what_a_request_reserved_and_never_settled_is_given_back_when_it_ends():
    clock, limits = Clock(), Limits(tokens_per_minute=600)
    limiter = RateLimiter(clock)
    budget = limiter.admit(1, limits)
    budget.try_reserve(250)
    budget.try_reserve(250)  # two inferences of one stream, say, both of which failed
    assert budget.try_reserve(101) is None
    budget.release()
    assert budget.try_reserve(600) is not None


def test_a_refund_never_takes_the_bucket_past_its_capacity():
    clock, limits = Clock(), Limits(tokens_per_minute=600)
    limiter = RateLimiter(clock)
    budget = limiter.admit(1, limits)
    held = budget.try_reserve(600)
    clock.now += 60.0  # the bucket refilled while the 600 counted as spent
    held.settle(0)
    assert budget.try_reserve(600) is not None and budget.try_reserve(1) is None


def test_a_token_without_a_token_limit_gets_no_budget():
    limiter = RateLimiter(Clock())
    assert limiter.admit(1, Limits(requests_per_second=5)) is None
    assert limiter.admit(1, Limits()) is None


def test_changed_limits_take_effect_at_once():
    clock = Clock()
    limiter = RateLimiter(clock)
    limiter.admit(1, Limits(requests_per_second=1))
    refused(limiter, 1, Limits(requests_per_second=1))
    limiter.admit(1, Limits(requests_per_second=100))


# Prompt tokens reserved before the work, with the model's real tokenizer


@pytest.fixture
def model(tokenizer):
    return SimpleNamespace(tokenizer=tokenizer, max_sequence_length=256, special_tokens=2, vision=None)  # [CLS] and [SEP]


SENTENCE = "A man is playing a guitar on the corner of the street."  # 54 bytes, 15 tokens with [CLS] and [SEP]


async def reserve(model, prompts, budget, context: RequestContext | None = None):
    context = context or RequestContext("r", "openai", "/v1/embeddings", token_id=1, token_budget=budget)
    bound = request_context.bind(context)  # as the transports bind each request
    try:
        return context, await reserve_prompt_tokens(model, prompts, "input", 25_600)
    finally:
        request_context.unbind(bound)


async def test_a_request_that_fits_reserves_its_estimate_and_settles_to_the_exact_count(model, tokenizer):
    assert len(tokenizer.encode(SENTENCE).ids) == 15
    limiter = RateLimiter(Clock())
    budget = limiter.admit(1, Limits(tokens_per_minute=600))
    _, held = await reserve(model, [Prompt(text=SENTENCE)] * 4, budget)
    assert held.amount == 4 * (len(SENTENCE) + 2)  # from the bytes, with [CLS] and [SEP]: no tokenizing
    held.settle(4 * 15)
    assert budget.try_reserve(600 - 60) is not None and budget.try_reserve(1) is None


async def test_an_image_reserves_the_models_image_tokens_exactly(model):
    seeing = SimpleNamespace(**vars(model) | {"vision": SimpleNamespace(image_tokens=50)})
    limiter = RateLimiter(Clock())
    budget = limiter.admit(1, Limits(tokens_per_minute=600))
    image = Prompt(image=ImageInput(b"an encoded image, never decoded to count it"))
    _, held = await reserve(seeing, [image, image, Prompt(text=SENTENCE)], budget)
    assert held.amount == 2 * 50 + len(SENTENCE) + 2
    # Refused as an estimate, counted exactly: still 50 an image.
    tight = limiter.admit(2, Limits(tokens_per_minute=100))  # 50 + 56 estimated does not fit; 50 + 15 does
    _, held = await reserve(seeing, [image, Prompt(text=SENTENCE)], tight)
    assert held.amount == 50 + 15


async def test_a_request_whose_estimate_does_not_fit_is_counted_exactly(model):
    limiter = RateLimiter(Clock())
    budget = limiter.admit(1, Limits(tokens_per_minute=100))
    # 4 * 56 = 224 estimated, over the 100; 60 exactly, which fits.
    _, held = await reserve(model, [Prompt(text=SENTENCE)] * 4, budget)
    assert held.amount == 60


async def test_a_request_that_cannot_fit_now_gets_429_with_the_wait_for_its_exact_count(model):
    clock = Clock()
    limiter = RateLimiter(clock)
    budget = limiter.admit(1, Limits(tokens_per_minute=120))  # 2 tokens a second
    budget.try_reserve(100)
    refused_request = RequestContext("r", "openai", "/v1/embeddings", token_id=1, token_budget=budget)
    with pytest.raises(ServiceError) as raised:
        await reserve(model, [Prompt(text=SENTENCE)] * 2, budget, refused_request)  # 30 tokens, 20 left: 5 s short
    assert raised.value.kind is ErrorKind.RATE_LIMITED and http_status(raised.value) == 429
    assert raised.value.rejection == "rate_limited"  # counted as such in the metrics, not as overload
    assert raised.value.retry_after_s == 5 and "120 tokens per minute" in raised.value.message
    clock.now += 5.0
    _context, held = await reserve(model, [Prompt(text=SENTENCE)] * 2, budget)
    assert held.amount == 30


async def test_a_request_over_a_whole_minutes_limit_gets_413_before_any_work_and_takes_nothing(model):
    limiter = RateLimiter(Clock())
    budget = limiter.admit(1, Limits(tokens_per_minute=3000))
    # The probe's request: 2048 texts, about 250,000 tokens, on a token allowed 3,000 a minute.
    refused_request = RequestContext("r", "openai", "/v1/embeddings", token_id=1, token_budget=budget)
    with pytest.raises(ServiceError) as raised:
        await reserve(model, [Prompt(text=SENTENCE * 9)] * 2048, budget, refused_request)
    assert raised.value.rejection == "too_large"
    error = raised.value
    assert (error.kind, http_status(error), error.param, error.retry_after_s) == (ErrorKind.PAYLOAD_TOO_LARGE, 413, "input", None)
    assert "3000 prompt tokens a minute" in error.message and "smaller requests" in error.message
    assert budget.try_reserve(3000) is not None  # the refusal held nothing: the token is not locked out


async def test_token_ids_are_counted_exactly_with_the_special_tokens_and_capped_at_the_model_limit(model):
    limiter = RateLimiter(Clock())
    budget = limiter.admit(1, Limits(tokens_per_minute=1000))
    _, held = await reserve(model, [Prompt(token_ids=[7592] * 10), Prompt(token_ids=[7592] * 900)], budget)
    assert held.amount == 12 + 256


async def test_texts_with_more_tokens_than_characters_are_still_covered_by_the_estimate(model, tokenizer):
    korean = "한국어 텍스트"  # 7 characters, 17 tokens: more tokens than characters, fewer than bytes
    limiter = RateLimiter(Clock())
    budget = limiter.admit(1, Limits(tokens_per_minute=1000))
    _, held = await reserve(model, [Prompt(text=korean)], budget)
    assert held.amount >= len(tokenizer.encode(korean).ids) == 17


async def test_without_a_token_limit_nothing_is_reserved(model):
    _, held = await reserve(model, [Prompt(text=SENTENCE)], None)
    assert held is UNMETERED
    held.settle(15)


# The login throttle


def throttle_refusal(throttle: LoginThrottle, email: str, host: str | None) -> ServiceError:
    with pytest.raises(ServiceError) as raised:
        throttle.begin(email, host)
    assert raised.value.kind is ErrorKind.RATE_LIMITED and http_status(raised.value) == 429
    return raised.value


def fail(throttle: LoginThrottle, email: str, host: str | None, times: int = 1) -> None:
    for _ in range(times):
        throttle.begin(email, host).end(succeeded=False)


def test_failed_logins_of_one_email_are_free_up_to_five_then_wait_a_doubling_time_up_to_15_minutes():
    clock = Clock()
    throttle = LoginThrottle(clock)
    fail(throttle, "a@example.com", "10.0.0.1", 5)
    throttle.begin("a@example.com", "10.0.0.2").end(succeeded=False)  # the sixth: 1 s to wait
    # From any address, with the right password or not: refused without checking it.
    assert throttle_refusal(throttle, "a@example.com", "10.0.0.3").retry_after_s == 1
    waits = []
    for _ in range(12):
        clock.now += throttle_refusal(throttle, "A@Example.com ", "10.0.0.4").retry_after_s
        fail(throttle, "a@example.com", f"10.0.1.{len(waits)}")
        waits.append(throttle_refusal(throttle, "a@example.com", "10.0.0.5").retry_after_s)
    assert waits == [2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900, 900]
    throttle.begin("b@example.com", "10.0.0.5").end(succeeded=True)  # other accounts are not affected


def test_a_successful_login_clears_the_accounts_failures_and_a_day_without_one_forgets_them():
    clock = Clock()
    throttle = LoginThrottle(clock)
    fail(throttle, "a@example.com", "10.0.0.1", 5)
    throttle.begin("a@example.com", "10.0.0.1").end(succeeded=True)
    fail(throttle, "a@example.com", "10.0.0.1", 5)
    throttle.begin("a@example.com", "10.0.0.1").end(succeeded=False)
    throttle_refusal(throttle, "a@example.com", "10.0.0.1")
    clock.now += 3600
    throttle.begin("a@example.com", "10.0.0.1").end(succeeded=False)
    assert throttle_refusal(throttle, "a@example.com", "10.0.0.1").retry_after_s == 2  # an hour later: still counted
    clock.now += 86_400
    fail(throttle, "a@example.com", "10.0.0.1", 5)  # five free again
    throttle.begin("a@example.com", "10.0.0.1").end(succeeded=None)  # never checked (store down): counts nothing
    throttle.begin("a@example.com", "10.0.0.1").end(succeeded=True)


def test_one_address_guessing_across_accounts_is_throttled_and_a_success_there_does_not_reset_it():
    clock = Clock()
    throttle = LoginThrottle(clock)
    for index in range(20):
        fail(throttle, f"user{index}@example.com", "192.0.2.7")
    throttle.begin("me@example.com", "192.0.2.7").end(succeeded=True)
    throttle.begin("user20@example.com", "192.0.2.7").end(succeeded=False)  # the 21st failure
    assert throttle_refusal(throttle, "someone-else@example.com", "192.0.2.7").retry_after_s == 1
    throttle.begin("someone-else@example.com", "192.0.2.8").end(succeeded=True)


def test_ipv6_clients_are_counted_by_their_slash_64():
    throttle = LoginThrottle(Clock())
    for index in range(21):
        fail(throttle, f"user{index}@example.com", f"2001:db8:1:2::{index:x}")
    throttle_refusal(throttle, "x@example.com", "2001:db8:1:2:ffff::1")
    throttle.begin("x@example.com", "2001:db8:1:3::1").end(succeeded=True)
    assert address_key("::ffff:192.0.2.1") == address_key("192.0.2.1") == "192.0.2.1"
    assert address_key(None) == "" and address_key("unix-socket") == "unix-socket"


def test_a_burst_cannot_check_more_passwords_at_once_than_the_counts_allow():
    throttle = LoginThrottle(Clock())
    first = throttle.begin("a@example.com", "10.0.0.1")
    # One check at a time per account, so a burst of guesses is counted before the next one runs.
    assert throttle_refusal(throttle, "a@example.com", "10.0.0.2").retry_after_s == 1
    second = throttle.begin("b@example.com", "10.0.0.1")
    throttle_refusal(throttle, "c@example.com", "10.0.0.1")  # two at a time per address
    first.end(succeeded=False)
    second.end(succeeded=True)
    throttle.begin("a@example.com", "10.0.0.2").end(succeeded=True)


def test_the_throttle_remembers_a_bounded_number_of_keys():
    throttle = LoginThrottle(Clock(), max_keys=3)
    fail(throttle, "a@example.com", "10.0.0.1", 6)
    throttle_refusal(throttle, "a@example.com", "10.0.0.9")
    for email in ("b@example.com", "c@example.com", "d@example.com"):
        fail(throttle, email, "10.0.0.9")
    throttle.begin("a@example.com", "10.0.0.9").end(succeeded=True)  # the least recently failed went first


def test_each_of_a_hosts_workers_grants_its_share_of_a_tokens_limits():
    """--workers 4: each process grants a quarter of each limit, so that four of them together grant the limit."""
    clock, limits = Clock(), Limits(requests_per_second=8, tokens_per_minute=600)
    limiter = RateLimiter(clock, workers=4)
    budgets = [limiter.admit(1, limits), limiter.admit(1, limits)]  # a burst of a quarter of 8 a second
    error = refused(limiter, 1, limits)
    assert error.retry_after_s == 1 and "8 requests per second (split over this host's 4 gateway workers)" in error.message
    budget = budgets[0]
    assert budget.tokens_per_minute == 150
    assert budget.try_reserve(151) is None and budget.try_reserve(150) is not None
    clock.now += 1.0  # 2.5 tokens a second: a quarter of 10
    assert budget.try_reserve(3) is None and budget.try_reserve(2) is not None

"""The per-token rate limiter on a controlled clock: what is admitted, when, and the Retry-After it computes."""

from __future__ import annotations

import pytest

from gateway.errors import ErrorKind, ServiceError
from gateway.rate_limit import RateLimiter
from gateway.token_store import Limits


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refused(limiter: RateLimiter, token_id: int, limits: Limits) -> ServiceError:
    with pytest.raises(ServiceError) as raised:
        limiter.admit(token_id, limits)
    assert raised.value.kind is ErrorKind.RATE_LIMITED and raised.value.http_status == 429
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


def test_tokens_per_minute_are_charged_after_the_request_and_refuse_while_in_debt():
    clock, limits = Clock(), Limits(tokens_per_minute=600)  # 10 tokens a second
    limiter = RateLimiter(clock)
    limiter.admit(1, limits)
    limiter.charge_tokens(1, 650)  # 50 tokens of debt: 5 s to pay back
    error = refused(limiter, 1, limits)
    assert error.retry_after_s == 6 and "600 tokens per minute" in error.message
    clock.now += 5.2
    limiter.admit(1, limits)


def test_changed_limits_take_effect_at_once():
    clock = Clock()
    limiter = RateLimiter(clock)
    limiter.admit(1, Limits(requests_per_second=1))
    refused(limiter, 1, Limits(requests_per_second=1))
    limiter.admit(1, Limits(requests_per_second=100))

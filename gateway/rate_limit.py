"""Per-token rate limits: requests per second and prompt tokens per minute, as token buckets.

A request's prompt tokens are known only once it has been tokenized, so the tokens-per-minute bucket is charged
after the request and may go into debt; a token in debt is refused until the bucket refills to above zero. That
is how a limit on tokens can be kept without tokenizing twice. Limits hold per gateway replica: the buckets live
in memory, where checking them costs nothing on the request path.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from gateway.errors import ErrorKind, ServiceError
from gateway.token_store import Limits


@dataclass
class TokenBucket:
    """`rate` units per second, holding at most `capacity`; starts full."""

    rate: float
    capacity: float
    level: float
    updated: float

    @classmethod
    def full(cls, rate: float, capacity: float, now: float) -> TokenBucket:
        return cls(rate, capacity, capacity, now)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` units are available (0 when they are now)."""
        return max(0.0, (amount - self.level) / self.rate)


@dataclass
class _TokenBuckets:
    limits: Limits
    requests: TokenBucket | None
    tokens: TokenBucket | None


def _refused(what: str, wait_s: float) -> ServiceError:
    retry_after = max(1, math.ceil(wait_s))
    return ServiceError(ErrorKind.RATE_LIMITED, f"rate limit of {what} exceeded; retry in {retry_after} s", retry_after_s=retry_after)


class RateLimiter:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._buckets: dict[int, _TokenBuckets] = {}

    def _buckets_of(self, token_id: int, limits: Limits, now: float) -> _TokenBuckets:
        buckets = self._buckets.get(token_id)
        if buckets is None or buckets.limits != limits:  # new, or an admin changed the limits
            rps, tpm = limits.requests_per_second, limits.tokens_per_minute
            buckets = _TokenBuckets(
                limits,
                # A burst of one second's worth of requests (at least one) is allowed, as most API gateways do.
                TokenBucket.full(rps, max(1.0, rps), now) if rps else None,
                TokenBucket.full(tpm / 60.0, float(tpm), now) if tpm else None,
            )
            self._buckets[token_id] = buckets
        return buckets

    def admit(self, token_id: int, limits: Limits) -> None:
        """Takes one request from the token's budget, or raises RATE_LIMITED with the seconds until it may retry."""
        if limits.requests_per_second is None and limits.tokens_per_minute is None:
            return
        now = self._clock()
        buckets = self._buckets_of(token_id, limits, now)
        if buckets.tokens is not None:
            buckets.tokens.refill(now)
            if buckets.tokens.level <= 0:
                raise _refused(f"{limits.tokens_per_minute} tokens per minute", buckets.tokens.wait_s(1.0))
        if buckets.requests is not None:
            buckets.requests.refill(now)
            if buckets.requests.level < 1:
                raise _refused(f"{limits.requests_per_second:g} requests per second", buckets.requests.wait_s(1.0))
            buckets.requests.level -= 1

    def charge_tokens(self, token_id: int, tokens: int) -> None:
        """Charges the prompt tokens a finished request used; the bucket may go into debt."""
        buckets = self._buckets.get(token_id)
        if buckets is not None and buckets.tokens is not None and tokens:
            buckets.tokens.refill(self._clock())
            buckets.tokens.level -= tokens

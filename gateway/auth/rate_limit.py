"""Per-token rate limits (requests per second, prompt tokens per minute) and the login throttle.

Both limits of a token are token buckets. Requests per second is taken from as a request is admitted. Prompt tokens
are reserved by each inference before its work (gateway.core.metering, through the request's TokenBudget) and
settled with the tokens it really used after it; what a call that failed reserved is given back when its request
ends. So no request takes more than the bucket holds.

Failed logins are counted per email and per client address, each with a few free failures and then a wait that
doubles with every further failure, so that guessing passwords online is slow whatever the caller spreads it over.

Both hold per gateway process: the state lives in memory, where checking it costs nothing on the request path. With
--workers N each of a host's N processes grants 1/N of every token's limits (its share), so that the host as a whole
grants no more than the token's limits.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.auth.store import Limits
from gateway.core.errors import rate_limited


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


class Reservation:
    """Prompt tokens one inference holds in its token's bucket until settle() says how many it used."""

    def __init__(self, budget: TokenBudget, amount: int):
        self._budget = budget
        self.amount = amount

    def settle(self, used: int) -> None:
        self._budget.settle(self, used)


class TokenBudget:
    """One request's access to its token's tokens-per-minute bucket, with the reservations it has not settled.
    tokens_per_minute: what this process grants of the token's limit (all of it, bar --workers)."""

    def __init__(self, bucket: TokenBucket, tokens_per_minute: int, clock: Callable[[], float]):
        self._bucket = bucket
        self.tokens_per_minute = tokens_per_minute
        self._clock = clock
        self._held: list[Reservation] = []

    def try_reserve(self, amount: int) -> Reservation | None:
        """Takes `amount` tokens when the bucket holds them now, else None."""
        self._bucket.refill(self._clock())
        if amount > self._bucket.level:
            return None
        self._bucket.level -= amount
        reservation = Reservation(self, amount)
        self._held.append(reservation)
        return reservation

    def wait_s(self, amount: int) -> float:
        self._bucket.refill(self._clock())
        return self._bucket.wait_s(amount)

    def settle(self, reservation: Reservation, used: int) -> None:
        """Gives back what a reservation held beyond what its inference used (or takes the shortfall)."""
        self._held.remove(reservation)
        bucket = self._bucket
        bucket.refill(self._clock())
        # The bucket refilled while the reservation counted as spent, so a refund must not take it past its capacity.
        bucket.level = min(bucket.capacity, bucket.level + reservation.amount - used)

    def release(self) -> None:
        """At the end of the request: inferences that never settled (refused, failed, cancelled) used nothing."""
        for reservation in list(self._held):
            self.settle(reservation, 0)


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic, workers: int = 1):
        """workers: the gateway processes of this host, each of which grants its share of every limit."""
        self._clock = clock
        self._workers = workers
        self._buckets: dict[int, _TokenBuckets] = {}

    def _share(self, limit: float) -> float:
        return limit / self._workers

    def _buckets_of(self, token_id: int, limits: Limits, now: float) -> _TokenBuckets:
        buckets = self._buckets.get(token_id)
        if buckets is None or buckets.limits != limits:  # new, or an admin changed the limits
            rps = self._share(limits.requests_per_second or 0)
            tpm = self._share(limits.tokens_per_minute or 0)
            buckets = _TokenBuckets(
                limits,
                # A burst of one second's worth of requests (at least one) is allowed, as most API gateways do.
                TokenBucket.full(rps, max(1.0, rps), now) if rps else None,
                TokenBucket.full(tpm / 60.0, tpm, now) if tpm else None,
            )
            self._buckets[token_id] = buckets
        return buckets

    def admit(self, token_id: int, limits: Limits) -> TokenBudget | None:
        """Takes one request from the token's budget, or raises RATE_LIMITED with the seconds until it may retry.

        Returns the request's hold on the token's prompt tokens, None when they are not limited."""
        if limits.requests_per_second is None and limits.tokens_per_minute is None:
            return None
        now = self._clock()
        buckets = self._buckets_of(token_id, limits, now)
        if buckets.tokens is not None:
            buckets.tokens.refill(now)
            # Every request needs at least one token; refused here, it costs nothing more.
            if buckets.tokens.level < 1:
                raise rate_limited(
                    f"rate limit of {limits.tokens_per_minute} tokens per minute{self._shared()} exceeded",
                    buckets.tokens.wait_s(1.0),
                )
        if buckets.requests is not None:
            buckets.requests.refill(now)
            if buckets.requests.level < 1:
                raise rate_limited(
                    f"rate limit of {limits.requests_per_second:g} requests per second{self._shared()} exceeded",
                    buckets.requests.wait_s(1.0),
                )
            buckets.requests.level -= 1
        if buckets.tokens is None:
            return None
        assert limits.tokens_per_minute is not None  # buckets.tokens exists only under that limit (_buckets_of)
        return TokenBudget(buckets.tokens, int(self._share(limits.tokens_per_minute)), self._clock)

    def _shared(self) -> str:
        return f" (split over this host's {self._workers} gateway workers)" if self._workers > 1 else ""


@dataclass(frozen=True)
class BackOff:
    """Failures a key may have for free, then a wait that doubles with each further failure from first_s up to
    max_s; a key with no failure for forget_s starts afresh. in_flight bounds its attempts being checked at once,
    so that a burst cannot run more guesses than the count allows before the first of them fails."""

    free: int
    first_s: float
    max_s: float
    forget_s: float
    in_flight: int

    def wait_s(self, failures: int) -> float:
        over = failures - self.free
        if over <= 0:
            return 0.0
        return min(self.max_s, self.first_s * 2.0 ** min(over - 1, 32))


# One account: 5 guesses free, then one every 15 minutes at most once the waits have doubled up to that, about 100 a
# day (NIST SP 800-63B: no more than 100 failures in a row), while a user who mistyped a few times waits seconds.
# Failures are forgotten only after a day without one: forgotten sooner, a guesser who pauses that long would start
# each day with several free guesses and a fast ramp again.
EMAIL_BACKOFF = BackOff(free=5, first_s=1.0, max_s=900.0, forget_s=86_400.0, in_flight=1)
# One address guessing across accounts; more is free, since several users may share an address behind NAT.
ADDRESS_BACKOFF = BackOff(free=20, first_s=1.0, max_s=900.0, forget_s=86_400.0, in_flight=2)
# Keys remembered per table; past it the least recently failed is forgotten. Filling it takes that many password
# checks, which the gateway runs a few at a time.
MAX_KEYS = 100_000


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    blocked_until: float = 0.0
    in_flight: int = 0


class _FailureTable:
    def __init__(self, policy: BackOff, max_keys: int):
        self.policy = policy
        self._max_keys = max_keys
        # Least recently failed (or tried) first, which is what goes when the table is full.
        self._entries: OrderedDict[str, _Failures] = OrderedDict()

    def wait_s(self, key: str, now: float) -> float:
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        if entry.in_flight == 0 and now - entry.last >= self.policy.forget_s:
            del self._entries[key]
            return 0.0
        if now < entry.blocked_until:
            return entry.blocked_until - now
        # A password check takes tens of milliseconds: the next attempt may come as soon as this one is answered.
        return 1.0 if entry.in_flight >= self.policy.in_flight else 0.0

    def begin(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None:
            while len(self._entries) >= self._max_keys:
                self._entries.popitem(last=False)
            entry = self._entries[key] = _Failures()
        entry.in_flight += 1

    def end(self, key: str, now: float, failed: bool, forget: bool) -> None:
        entry = self._entries.get(key)
        if entry is None:  # dropped while the attempt ran, the table being full
            return
        entry.in_flight -= 1
        if failed:
            entry.count += 1
            entry.last = now
            entry.blocked_until = now + self.policy.wait_s(entry.count)
            self._entries.move_to_end(key)
        elif (forget or entry.count == 0) and entry.in_flight == 0:
            del self._entries[key]


def address_key(host: str | None) -> str:
    """An IPv6 client is counted by its /64, which one holder commonly has whole; anything else by its address."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return host or ""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class LoginAttempt:
    """One password check let through by the throttle; end() it exactly once with its outcome."""

    def __init__(self, throttle: LoginThrottle, email: str, address: str):
        self._throttle = throttle
        self._email = email
        self._address = address

    def end(self, succeeded: bool | None) -> None:
        """succeeded: True for the right password, False for a wrong one or an unknown email, None when the
        password was never checked (store down, request cancelled), which counts as nothing."""
        throttle = self._throttle
        now = throttle.clock()
        failed = succeeded is False
        # A success clears the account's failures but not the address's: else one valid login would reset an address
        # that guesses at every other account.
        throttle.by_email.end(self._email, now, failed, forget=succeeded is True)
        throttle.by_address.end(self._address, now, failed, forget=False)


class LoginThrottle:
    """Decides whether a login may check its password now; see BackOff for the policy."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        by_email: BackOff = EMAIL_BACKOFF,
        by_address: BackOff = ADDRESS_BACKOFF,
        max_keys: int = MAX_KEYS,
    ):
        self.clock = clock
        self.by_email = _FailureTable(by_email, max_keys)
        self.by_address = _FailureTable(by_address, max_keys)

    def begin(self, email: str, client_host: str | None) -> LoginAttempt:
        """The attempt, or RATE_LIMITED with the seconds to wait. A refused attempt checks no password, so that
        guessing while refused learns nothing, and answers the same whether the email exists or not."""
        email, address = email.strip().lower(), address_key(client_host)
        now = self.clock()
        wait_s = max(self.by_email.wait_s(email, now), self.by_address.wait_s(address, now))
        if wait_s > 0:
            raise rate_limited("too many failed logins for this email or from this address", wait_s)
        self.by_email.begin(email)
        self.by_address.begin(address)
        return LoginAttempt(self, email, address)

"""Who is calling: bearer tokens checked against the token store, per-token limits, and per-token usage.

The store is asked at most every CACHE_TTL_S per token, so authentication costs a dictionary lookup on the
request path, and a token revoked on any replica sharing the store is refused everywhere within that time.
Usage is counted in memory and written in one transaction every FLUSH_INTERVAL_S, so a busy token costs the
database two writes a second, not one per request. A store that stops answering makes the gateway not ready and
every authenticated call 503: nothing is let through on a stale answer.

Logins go through the LoginThrottle (gateway/auth/rate_limit.py) before their password is checked, and at most
MAX_CONCURRENT_LOGINS are checked at once with MAX_QUEUED_LOGINS waiting; past that a login is refused as overload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.auth.rate_limit import LoginThrottle, RateLimiter, TokenBudget
from gateway.auth.store import Principal, StoreUnavailable, TokenMetadata, TokenStore, Usage, User
from gateway.core.errors import ErrorKind, ServiceError
from gateway.ops.request_context import RequestContext

log = logging.getLogger("gateway.auth")

# How stale an answer about a token may be: also the bound on how long a revoked token keeps working elsewhere.
CACHE_TTL_S = 0.5
FLUSH_INTERVAL_S = 0.5
PING_INTERVAL_S = 1.0
# Entries beyond this are dropped wholesale; it bounds the memory a flood of made-up tokens can take.
CACHE_MAX_ENTRIES = 10_000
# argon2 takes tens of milliseconds and 64 MiB per login; more at once would starve the event loop's threads.
MAX_CONCURRENT_LOGINS = 2
# Logins waiting for a check: about half a second's worth. More would only answer later what a client should retry.
MAX_QUEUED_LOGINS = 16


def unauthenticated(message: str) -> ServiceError:
    return ServiceError(ErrorKind.UNAUTHENTICATED, message)


def forbidden(message: str) -> ServiceError:
    return ServiceError(ErrorKind.FORBIDDEN, message)


def store_unavailable() -> ServiceError:
    return ServiceError(ErrorKind.UNAVAILABLE, "the token store is unavailable; retry shortly")


def bearer_secret(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header (gRPC metadata `authorization` alike)."""
    if not authorization:
        raise unauthenticated("missing credentials: send 'Authorization: Bearer <token>'")
    scheme, _, secret = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise unauthenticated("unsupported credentials: send 'Authorization: Bearer <token>'")
    return secret.strip()


def _added(a: Usage, b: Usage) -> Usage:
    return Usage(a.requests + b.requests, a.texts + b.texts, a.prompt_tokens + b.prompt_tokens)


@dataclass
class _Cached:
    principal: Principal | None
    expires: float


class Authenticator:
    def __init__(self, store: TokenStore, workers: int = 1):
        """workers: the gateway processes of this host (--workers), which split each token's rate limits."""
        self.store = store
        self.limiter = RateLimiter(workers=workers)
        self.store_ok = True
        self._cache: dict[bytes, _Cached] = {}
        self._lookups: dict[bytes, asyncio.Future] = {}
        self._unflushed: dict[int, Usage] = {}
        # Held while a flush writes: usage swapped out of _unflushed but not yet committed is in neither place.
        self._flushing = asyncio.Lock()
        self._logins = asyncio.Semaphore(MAX_CONCURRENT_LOGINS)
        self._queued_logins = 0
        self.login_throttle = LoginThrottle()

    # -- the request path ---------------------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller of a request, or UNAUTHENTICATED; UNAVAILABLE when the store cannot say."""
        secret = bearer_secret(authorization)
        if not self.store_ok:
            raise store_unavailable()
        key = hashlib.sha256(secret.encode()).digest()
        cached = self._cache.get(key)
        if cached is None or cached.expires < time.monotonic():
            principal = await self._lookup(key, secret)
        else:
            principal = cached.principal
        if principal is None:
            raise unauthenticated("invalid or revoked token")
        return principal

    async def _lookup(self, key: bytes, secret: str) -> Principal | None:
        # Concurrent requests with one token whose entry expired share a single query.
        pending = self._lookups.get(key)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self.store.authenticate, secret))
            self._lookups[key] = pending
            pending.add_done_callback(lambda _: self._lookups.pop(key, None))
        try:
            principal = await asyncio.shield(pending)
        except StoreUnavailable:
            self.store_ok = False
            raise store_unavailable() from None
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            self._cache.clear()
        self._cache[key] = _Cached(principal, time.monotonic() + CACHE_TTL_S)
        return principal

    def admit(self, principal: Principal) -> TokenBudget | None:
        """One request taken from the token's rate limit; the request's hold on its prompt tokens, if they are limited."""
        return self.limiter.admit(principal.token_id, principal.limits)

    def record(self, context: RequestContext, served: bool) -> None:
        """Counts a finished request in its token's usage: a request when it was served, and the texts and prompt
        tokens it embedded either way (a stream cut short has used them). A refused request leaves no trace."""
        if context.token_id is None:
            return
        usage = Usage(int(served), context.texts, context.tokens)
        if usage != Usage():
            self._count(context.token_id, usage)

    def _count(self, token_id: int, usage: Usage) -> None:
        self._unflushed[token_id] = _added(self._unflushed.get(token_id, Usage()), usage)

    # -- token management -------------------------------------------------------------------------------

    def forget_cached(self) -> None:
        """After a revocation here, this replica refuses the token at once instead of after CACHE_TTL_S."""
        self._cache.clear()

    async def with_usage(self, method, *args):
        """A store read of token metadata (one or a list) with the usage this replica has counted but not yet written.

        Waits for a flush in progress, so that a request counted here is never missing from what a caller reads.
        """
        async with self._flushing:
            result = await self.call_store(method, *args)
        if isinstance(result, list):
            return [self._with_unflushed(metadata) for metadata in result]
        return self._with_unflushed(result)

    def _with_unflushed(self, metadata: TokenMetadata) -> TokenMetadata:
        extra = self._unflushed.get(metadata.token_id)
        if extra is None:
            return metadata
        return dataclasses.replace(metadata, usage=_added(metadata.usage, extra))

    async def call_store(self, method, *args):
        """A store call off the event loop; a store that cannot be reached answers 503."""
        try:
            return await asyncio.to_thread(method, *args)
        except StoreUnavailable:
            self.store_ok = False
            raise store_unavailable() from None

    async def login(self, email: str, password: str, client_host: str | None) -> User | None:
        """The user, None for a wrong email or password; RATE_LIMITED while the email or the address must wait,
        OVERLOADED when too many logins are already waiting."""
        attempt = self.login_throttle.begin(email, client_host)
        succeeded = None
        try:
            if self._queued_logins >= MAX_QUEUED_LOGINS:
                raise ServiceError(ErrorKind.OVERLOADED, "too many logins are being checked; retry shortly", retry_after_s=1)
            self._queued_logins += 1
            try:
                await self._logins.acquire()
            finally:
                self._queued_logins -= 1
            try:
                user = await self.call_store(self.store.login, email, password)
            finally:
                self._logins.release()
            succeeded = user is not None
            return user
        finally:
            attempt.end(succeeded)

    # -- background -------------------------------------------------------------------------------------

    async def flush(self) -> None:
        if not self._unflushed:
            return
        async with self._flushing:
            usage, self._unflushed = self._unflushed, {}
            try:
                await asyncio.to_thread(self.store.add_usage, usage, datetime.now(UTC))
            except Exception as error:
                log.warning("could not write token usage, will retry: %s", error)
                for token_id, counted in usage.items():
                    self._count(token_id, counted)

    async def probe(self) -> None:
        try:
            await asyncio.to_thread(self.store.ping)
        except StoreUnavailable as error:
            if self.store_ok:
                log.error("token store unavailable: %s", error)
            self.store_ok = False
            return
        if not self.store_ok:
            log.info("token store reachable again")
            self._cache.clear()
        self.store_ok = True

    async def run(self) -> None:
        """Probes the store and writes usage until cancelled; writes what is left when cancelled."""
        last_ping = 0.0
        try:
            while True:
                if time.monotonic() - last_ping >= PING_INTERVAL_S:
                    await self.probe()
                    last_ping = time.monotonic()
                await self.flush()
                await asyncio.sleep(FLUSH_INTERVAL_S)
        finally:
            await asyncio.shield(self.flush())

"""The Authenticator over a real SQLite token store: credentials parsing, caching, revocation, usage and outages; the
login throttle and queue in front of argon2; and what the request policy counts and limits per request."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.auth import authenticator as auth
from gateway.auth.authenticator import Authenticator
from gateway.auth.store import Limits, StoreUnavailable, open_store
from gateway.core.errors import ErrorKind, ServiceError, note_answered
from gateway.ops import request_context
from gateway.ops.metrics import Metrics
from gateway.ops.request_context import RequestContext
from gateway.transports.http.status import http_status
from gateway.transports.policy import RequestPolicy


@pytest.fixture
def store(tmp_path):
    store = open_store(tmp_path / "auth.sqlite3")
    store.add_user("a@example.com", "client", None)
    yield store
    store.close()


async def refused(authenticator: Authenticator, header: str | None) -> ServiceError:
    with pytest.raises(ServiceError) as raised:
        await authenticator.authenticate(header)
    return raised.value


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer  ", "Basic dXNlcjpwYXNz", "Token abc", "bearer"])
async def test_anything_but_a_bearer_token_is_unauthenticated(store, header):
    error = await refused(Authenticator(store), header)
    assert error.kind is ErrorKind.UNAUTHENTICATED and "Bearer" in error.message


async def test_a_valid_token_resolves_to_its_user_and_the_scheme_is_case_insensitive(store):
    metadata, secret = store.create_token("a@example.com", "t")
    principal = await Authenticator(store).authenticate(f"bearer {secret}")
    assert (principal.token_id, principal.user_email, principal.role) == (metadata.token_id, "a@example.com", "client")


async def test_a_token_revoked_elsewhere_is_refused_once_the_cache_entry_expires(store, monkeypatch):
    monkeypatch.setattr(auth, "CACHE_TTL_S", 0.2)
    metadata, secret = store.create_token("a@example.com", "t")
    authenticator = Authenticator(store)
    await authenticator.authenticate(f"Bearer {secret}")
    store.revoke(metadata.token_id)  # as another replica would
    await authenticator.authenticate(f"Bearer {secret}")  # still cached
    await asyncio.sleep(0.25)
    assert (await refused(authenticator, f"Bearer {secret}")).kind is ErrorKind.UNAUTHENTICATED


async def test_concurrent_requests_with_one_token_share_one_store_lookup(store, monkeypatch):
    _, secret = store.create_token("a@example.com", "t")
    lookups = []
    original = store.authenticate
    monkeypatch.setattr(store, "authenticate", lambda s: lookups.append(s) or original(s))
    authenticator = Authenticator(store)
    principals = await asyncio.gather(*(authenticator.authenticate(f"Bearer {secret}") for _ in range(20)))
    assert len({p.token_id for p in principals}) == 1
    assert len(lookups) == 1


async def test_usage_is_written_on_flush_and_shown_before_it(store):
    metadata, _ = store.create_token("a@example.com", "t")
    authenticator = Authenticator(store)
    for texts, tokens in [(3, 30), (1, 7)]:
        context = RequestContext("r", "openai", "/v1/embeddings", token_id=metadata.token_id)
        context.add_usage(texts, tokens)
        authenticator.record(context, served=True)
    shown = await authenticator.with_usage(store.token, metadata.token_id)
    assert (shown.usage.requests, shown.usage.texts, shown.usage.prompt_tokens) == (2, 4, 37)
    assert store.token(metadata.token_id).usage.requests == 0
    await authenticator.flush()
    stored = store.token(metadata.token_id)
    assert (stored.usage.requests, stored.usage.texts, stored.usage.prompt_tokens) == (2, 4, 37)
    assert stored.last_used is not None
    assert (await authenticator.with_usage(store.token, metadata.token_id)).usage == stored.usage


async def test_usage_being_written_is_counted_by_a_read_during_the_write(store, monkeypatch):
    metadata, _ = store.create_token("a@example.com", "t")
    authenticator = Authenticator(store)
    authenticator.record(RequestContext("r", "openai", "/v1/embeddings", token_id=metadata.token_id), served=True)
    writing, release = threading.Event(), threading.Event()
    original = store.add_usage

    def slow(*args):
        writing.set()
        release.wait(5)
        original(*args)

    monkeypatch.setattr(store, "add_usage", slow)
    flush = asyncio.ensure_future(authenticator.flush())
    await asyncio.to_thread(writing.wait, 5)
    read = asyncio.ensure_future(authenticator.with_usage(store.tokens, "a@example.com"))
    await asyncio.sleep(0.1)
    release.set()
    await flush
    [listed] = await read
    assert listed.usage.requests == 1


async def test_usage_that_cannot_be_written_is_kept_for_the_next_flush(store, monkeypatch):
    metadata, _ = store.create_token("a@example.com", "t")
    authenticator = Authenticator(store)
    authenticator.record(RequestContext("r", "openai", "/v1/embeddings", token_id=metadata.token_id), served=True)
    original = store.add_usage

    def down(*args):
        raise StoreUnavailable("down")

    monkeypatch.setattr(store, "add_usage", down)
    await authenticator.flush()
    monkeypatch.setattr(store, "add_usage", original)
    authenticator.record(RequestContext("r", "openai", "/v1/embeddings", token_id=metadata.token_id), served=True)
    await authenticator.flush()
    assert store.token(metadata.token_id).usage.requests == 2


async def test_a_store_that_stops_answering_turns_every_call_into_503_until_it_answers_again(store, monkeypatch):
    _, secret = store.create_token("a@example.com", "t")
    authenticator = Authenticator(store)
    await authenticator.authenticate(f"Bearer {secret}")
    original = store.ping

    def down():
        raise StoreUnavailable("down")

    monkeypatch.setattr(store, "ping", down)
    await authenticator.probe()
    assert not authenticator.store_ok
    error = await refused(authenticator, f"Bearer {secret}")  # cached, and still refused
    assert error.kind is ErrorKind.UNAVAILABLE and http_status(error) == 503 and error.retry_after_s
    monkeypatch.setattr(store, "ping", original)
    await authenticator.probe()
    assert (await authenticator.authenticate(f"Bearer {secret}")).user_email == "a@example.com"


# Logins: the throttle and the bounded queue in front of argon2


@pytest.fixture
def with_password(store):
    store.add_user("p@example.com", "client", "a long passphrase")
    return store


async def test_a_throttled_login_is_refused_without_checking_the_password(with_password, monkeypatch):
    authenticator = Authenticator(with_password)
    checked = []
    original = with_password.login
    monkeypatch.setattr(with_password, "login", lambda *args: checked.append(args) or original(*args))
    for _ in range(6):
        assert await authenticator.login("p@example.com", "wrong", "10.0.0.1") is None
    with pytest.raises(ServiceError) as raised:
        await authenticator.login("p@example.com", "a long passphrase", "10.0.0.2")
    assert raised.value.kind is ErrorKind.RATE_LIMITED and raised.value.retry_after_s >= 1
    assert len(checked) == 6


async def test_logins_past_the_queue_bound_are_refused_as_overload_and_the_rest_are_checked(with_password, monkeypatch):
    authenticator = Authenticator(with_password)
    started, release = threading.Semaphore(0), threading.Event()

    def slow_login(email, password):
        started.release()
        release.wait(10)
        return None

    monkeypatch.setattr(with_password, "login", slow_login)
    admitted = auth.MAX_CONCURRENT_LOGINS + auth.MAX_QUEUED_LOGINS
    # Each from its own email and address, so that only the queue bound can refuse them.
    logins = [asyncio.ensure_future(authenticator.login(f"u{i}@example.com", "pw", f"10.0.1.{i}")) for i in range(admitted)]
    for _ in range(auth.MAX_CONCURRENT_LOGINS):
        await asyncio.to_thread(started.acquire, timeout=10)
    with pytest.raises(ServiceError) as raised:
        await authenticator.login("late@example.com", "pw", "10.0.2.1")
    assert raised.value.kind is ErrorKind.OVERLOADED and http_status(raised.value) == 429 and raised.value.retry_after_s == 1
    release.set()
    assert await asyncio.gather(*logins) == [None] * admitted


# What every request leaves behind: usage, and the rate limit it is checked against


def limited_token(store, **limits):
    metadata, secret = store.create_token("a@example.com", "limited", Limits(**limits))
    return metadata.token_id, f"Bearer {secret}"


async def test_only_served_requests_count_in_usage(store):
    token_id, header = limited_token(store, requests_per_second=2)
    authenticator = Authenticator(store)
    policy = RequestPolicy(authenticator, Metrics())
    served, invalid, refused = (RequestContext("r", "openai", "/v1/embeddings") for _ in range(3))
    await policy.admit(served, header)
    served.add_usage(3, 30)
    policy.finish(served, "200", None)
    await policy.admit(invalid, header)
    policy.finish(invalid, "400", None)
    with pytest.raises(ServiceError):
        await policy.admit(refused, header)  # the third within a second
    policy.finish(refused, "429", "rate_limited")
    shown = await authenticator.with_usage(store.token, token_id)
    assert (shown.usage.requests, shown.usage.texts, shown.usage.prompt_tokens) == (1, 3, 30)


async def test_a_token_over_its_rate_limit_can_still_manage_its_tokens(store):
    _, header = limited_token(store, requests_per_second=0.5)
    metrics = Metrics()
    policy = RequestPolicy(Authenticator(store), metrics)
    await policy.admit(RequestContext("r", "openai", "/v1/embeddings"), header)
    refused_context = RequestContext("r", "openai", "/v1/embeddings")
    bound = request_context.bind(refused_context)  # as the transports bind each request
    try:
        with pytest.raises(ServiceError) as raised:
            await policy.admit(refused_context, header)
        note_answered(raised.value)  # as each transport does where it turns the error into its status
    finally:
        request_context.unbind(bound)
    assert raised.value.kind is ErrorKind.RATE_LIMITED
    for route in ("/users/me/tokens", "/users/me/tokens/{token_id}", "/users/{email}/tokens"):
        await policy.admit(RequestContext("r", "aleph_alpha", route), header)
    # Finished with no reason given by the transport, as a 429 raised inside a route is (prompt tokens, logins): the
    # error's kind, noted on the request, still says rate limit.
    policy.finish(refused_context, "429", None)
    assert metrics.registry.get_sample_value("embed_gateway_rejections_total", {"reason": "rate_limited"}) == 1
    assert metrics.registry.get_sample_value("embed_gateway_rejections_total", {"reason": "overloaded"}) == 0


async def test_prompt_tokens_a_request_reserved_and_did_not_use_are_given_back_when_it_finishes(store):
    _, header = limited_token(store, tokens_per_minute=600)
    policy = RequestPolicy(Authenticator(store), Metrics())
    context = RequestContext("r", "openai", "/v1/embeddings")
    await policy.admit(context, header)
    assert context.token_budget.try_reserve(600) is not None  # then the inference failed: nothing settled
    policy.finish(context, "503", None)
    later = RequestContext("r", "openai", "/v1/embeddings")
    await policy.admit(later, header)
    assert later.token_budget.try_reserve(600) is not None

"""The Authenticator over a real SQLite token store: credentials parsing, caching, revocation, usage and outages."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway import auth
from gateway.auth import Authenticator
from gateway.errors import ErrorKind, ServiceError
from gateway.request_context import RequestContext
from gateway.token_store import StoreUnavailable, open_store


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
        authenticator.record(context)
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
    authenticator.record(RequestContext("r", "openai", "/v1/embeddings", token_id=metadata.token_id))
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
    authenticator.record(RequestContext("r", "openai", "/v1/embeddings", token_id=metadata.token_id))
    original = store.add_usage

    def down(*args):
        raise StoreUnavailable("down")

    monkeypatch.setattr(store, "add_usage", down)
    await authenticator.flush()
    monkeypatch.setattr(store, "add_usage", original)
    authenticator.record(RequestContext("r", "openai", "/v1/embeddings", token_id=metadata.token_id))
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
    assert error.kind is ErrorKind.UNAVAILABLE and error.http_status == 503 and error.retry_after_s
    monkeypatch.setattr(store, "ping", original)
    await authenticator.probe()
    assert (await authenticator.authenticate(f"Bearer {secret}")).user_email == "a@example.com"

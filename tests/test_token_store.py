"""gateway.auth.store against SQLite and a real PostgreSQL: users, passwords, tokens, limits, usage and outages."""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import sqlite3
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import argon2
import psycopg
import pytest

from gateway.auth.store import (
    Limits,
    Principal,
    StoreUnavailable,
    UnknownUser,
    Usage,
    User,
    UserExists,
    open_store,
)
from harness.postgres_server import PostgresServer, free_port
from harness.servers import starts_servers

_schemas = itertools.count()


@pytest.fixture(scope="module")
@starts_servers
def postgres():
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.e2e)])
def location(request, tmp_path) -> str:
    """A fresh database for each test: a new SQLite file, or a new schema on the module's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "state" / "tokens.db")
    return request.getfixturevalue("postgres").create_schema(f"store_{next(_schemas)}")


@pytest.fixture
def store(location):
    opened = open_store(location)
    yield opened
    opened.close()


def raw(location: str, query: str, params: tuple = ()) -> list[tuple]:
    """Reads or changes the database behind the store's back, with ? placeholders."""
    if location.startswith("postgresql://"):
        with psycopg.connect(location, autocommit=True) as connection:
            cursor = connection.execute(query.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []
    with closing(sqlite3.connect(location)) as connection:
        rows = connection.execute(query, params).fetchall()
        connection.commit()
        return rows


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# Users and passwords


def test_add_user_and_look_up(store):
    admin = store.add_user("root@example.com", "admin", None)
    client = store.add_user("app@example.com", "client", None)
    assert admin == User(admin.id, "root@example.com", "admin")
    assert client.role == "client" and client.id != admin.id
    assert store.user("app@example.com") == client
    assert store.user("nobody@example.com") is None
    assert store.users() == [admin, client]


def test_duplicate_user_is_refused_and_the_first_kept(store):
    first = store.add_user("a@example.com", "client", None)
    with pytest.raises(UserExists):
        store.add_user("a@example.com", "admin", None)
    assert store.users() == [first]
    assert store.user("a@example.com").role == "client"


def test_bad_role_or_empty_email_is_a_value_error(store):
    for email, role in [("a@example.com", "root"), ("a@example.com", ""), ("", "client"), ("  ", "admin")]:
        with pytest.raises(ValueError):
            store.add_user(email, role, None)
    assert store.users() == []


def test_login(store):
    user = store.add_user("a@example.com", "client", "correct horse")
    store.add_user("token-only@example.com", "client", None)
    assert store.login("a@example.com", "correct horse") == user
    assert store.login("a@example.com", "correct horsE") is None
    assert store.login("nobody@example.com", "correct horse") is None
    assert store.login("token-only@example.com", "") is None


def test_login_verifies_a_hash_even_when_there_is_none(store, monkeypatch):
    """Unknown users and token-only users cost one argon2 verify too, so timing does not tell which emails exist."""
    store.add_user("token-only@example.com", "client", None)
    verified = []
    real_verify = argon2.PasswordHasher.verify

    def counting_verify(self, hash, password):
        verified.append(hash)
        return real_verify(self, hash, password)

    monkeypatch.setattr(argon2.PasswordHasher, "verify", counting_verify)
    assert store.login("nobody@example.com", "guess") is None
    assert store.login("token-only@example.com", "guess") is None
    assert len(verified) == 2 and all(hash.startswith("$argon2id$") for hash in verified)


def test_password_is_stored_as_argon2id(store, location):
    store.add_user("a@example.com", "admin", "s3cret-password")
    ((stored,),) = raw(location, "SELECT password_hash FROM users WHERE email = ?", ("a@example.com",))
    assert stored.startswith("$argon2id$")
    assert "s3cret-password" not in stored
    assert argon2.PasswordHasher().verify(stored, "s3cret-password")


def test_set_password(store):
    user = store.add_user("a@example.com", "client", None)
    store.set_password("a@example.com", "new password")
    assert store.login("a@example.com", "new password") == user
    store.set_password("a@example.com", "newer password")
    assert store.login("a@example.com", "new password") is None
    assert store.login("a@example.com", "newer password") == user
    with pytest.raises(UnknownUser):
        store.set_password("nobody@example.com", "password")


def test_login_rehashes_an_outdated_hash(store, location):
    user = store.add_user("a@example.com", "client", "password one")
    weak = argon2.PasswordHasher(time_cost=1, memory_cost=8192).hash("password one")
    raw(location, "UPDATE users SET password_hash = ? WHERE email = ?", (weak, "a@example.com"))
    assert store.login("a@example.com", "password one") == user
    ((stored,),) = raw(location, "SELECT password_hash FROM users")
    assert stored != weak and stored.startswith("$argon2id$")
    assert not argon2.PasswordHasher().check_needs_rehash(stored)


# Tokens


def test_created_token_authenticates_as_its_user(store):
    store.add_user("a@example.com", "admin", None)
    before = datetime.now(UTC)
    metadata, secret = store.create_token("a@example.com", "ci runner", Limits(2.5, 1000))
    assert metadata.user_email == "a@example.com" and metadata.description == "ci runner"
    assert metadata.limits == Limits(2.5, 1000) and metadata.usage == Usage() and metadata.last_used is None
    assert metadata.created.tzinfo == UTC and before <= metadata.created <= datetime.now(UTC)
    assert isinstance(metadata.token_id, int) and 0 < metadata.token_id < 2**31
    assert store.authenticate(secret) == Principal(metadata.token_id, "a@example.com", "admin", Limits(2.5, 1000))
    assert store.token(metadata.token_id) == metadata
    with pytest.raises(UnknownUser):
        store.create_token("nobody@example.com", "x")


def test_secret_has_256_bits_and_the_prefix(store):
    store.add_user("a@example.com", "client", None)
    secrets = [store.create_token("a@example.com", f"token {n}")[1] for n in range(3)]
    assert len(set(secrets)) == 3
    for secret in secrets:
        assert secret.startswith("emb_") and len(secret) == 4 + 43
        assert len(base64.urlsafe_b64decode(secret[4:] + "=")) == 32


def test_secret_is_nowhere_in_the_sqlite_files(tmp_path):
    path = tmp_path / "tokens.db"
    store = open_store(path)
    store.add_user("a@example.com", "client", None)
    metadata, secret = store.create_token("a@example.com", "laptop")
    store.add_usage({metadata.token_id: Usage(1, 1, 5)}, datetime.now(UTC))

    def stored_bytes() -> bytes:
        return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())

    # WAL mode: the new rows are in the -wal file until a checkpoint; the hash being there shows what is read is the data.
    assert Path(f"{path}-wal").exists()
    assert sha256(secret).encode() in stored_bytes()
    assert secret.encode() not in stored_bytes() and secret[4:].encode() not in stored_bytes()
    store.close()  # checkpoints the WAL into the main file
    assert sha256(secret).encode() in stored_bytes() and secret.encode() not in stored_bytes()


@pytest.fixture
def usual_umask():
    """The umask most systems give users (022), under which a file created without a mode is world-readable."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def modes(*paths: Path) -> list[int]:
    return [stat.S_IMODE(path.stat().st_mode) for path in paths]


def test_the_sqlite_files_and_the_directory_made_for_them_are_private(tmp_path, usual_umask):
    path = tmp_path / "run" / "auth.sqlite3"
    store = open_store(path)
    store.add_user("a@example.com", "client", "a long passphrase")  # a password hash, in the -wal file for now
    store.create_token("a@example.com", "laptop")
    files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
    assert modes(path.parent, *files) == [0o700, 0o600, 0o600, 0o600]
    store.close()


def test_files_an_older_version_left_world_readable_are_made_private_when_opened(tmp_path, usual_umask):
    path = tmp_path / "auth.sqlite3"
    files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
    with closing(sqlite3.connect(path)) as connection:  # as an older version created it: 0644, in WAL mode
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("CREATE TABLE t (x)")
        os.chmod(path, 0o644)
        opened = open_store(path)
        assert modes(*files) == [0o600] * 3
        opened.close()


@pytest.mark.e2e
def test_secret_is_in_no_column_in_postgres(postgres):
    location = postgres.create_schema(f"store_{next(_schemas)}")
    store = open_store(location)
    store.add_user("a@example.com", "client", None)
    _, secret = store.create_token("a@example.com", "laptop")
    store.close()
    query = "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = 'tokens'"
    columns = [name for (name,) in raw(location, query)]
    assert {"secret_sha256", "description", "created"} <= set(columns)
    (row,) = raw(location, "SELECT * FROM tokens")
    assert len(row) == len(columns)
    assert sha256(secret) in [str(value) for value in row]
    assert not any(secret[4:] in str(value) for value in row)
    # Whole rows as text too, every table: nothing holds the secret under another name.
    for table in ("users", "tokens"):
        assert not any(secret[4:] in text for (text,) in raw(location, f"SELECT t::text FROM {table} t"))


def test_malformed_and_unknown_secrets_are_refused(store):
    store.add_user("a@example.com", "client", None)
    _, secret = store.create_token("a@example.com", "x")
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for candidate in ["", "emb_", secret[:-1], secret + "A", "sk_" + secret[3:], flipped, secret[:-1] + "é", secret.upper()]:
        assert store.authenticate(candidate) is None, candidate
    assert store.authenticate(secret) is not None


def test_revoke(store):
    store.add_user("a@example.com", "client", None)
    kept, kept_secret = store.create_token("a@example.com", "kept")
    revoked, revoked_secret = store.create_token("a@example.com", "revoked")
    assert store.revoke(revoked.token_id) is True
    assert store.authenticate(revoked_secret) is None
    assert store.token(revoked.token_id) is None
    assert store.revoke(revoked.token_id) is False
    assert store.revoke(987654) is False
    assert store.authenticate(kept_secret).token_id == kept.token_id
    assert [t.token_id for t in store.tokens("a@example.com")] == [kept.token_id]


def test_tokens_lists_live_tokens_per_user(store):
    store.add_user("a@example.com", "client", None)
    store.add_user("b@example.com", "admin", None)
    a1, _ = store.create_token("a@example.com", "a one")
    b1, _ = store.create_token("b@example.com", "b one")
    a2, _ = store.create_token("a@example.com", "a two", Limits(tokens_per_minute=60))
    a3, _ = store.create_token("a@example.com", "a three")
    store.revoke(a3.token_id)
    assert store.tokens("a@example.com") == [a1, a2]
    assert store.tokens("b@example.com") == [b1]
    assert store.tokens("nobody@example.com") == []
    assert store.tokens(None) == [a1, b1, a2]


def test_tokens_of_a_deleted_user_are_refused(store, location):
    store.add_user("a@example.com", "client", None)
    store.add_user("b@example.com", "client", None)
    _, secret = store.create_token("a@example.com", "x")
    other, other_secret = store.create_token("b@example.com", "y")
    raw(location, "DELETE FROM users WHERE email = ?", ("a@example.com",))
    assert store.authenticate(secret) is None
    assert store.tokens(None) == [other]
    assert store.authenticate(other_secret).user_email == "b@example.com"


def test_set_limits(store):
    store.add_user("a@example.com", "client", None)
    metadata, secret = store.create_token("a@example.com", "x")
    assert store.authenticate(secret).limits == Limits()
    updated = store.set_limits(metadata.token_id, Limits(0.5, 120))
    assert updated.limits == Limits(0.5, 120) and updated.token_id == metadata.token_id and updated.created == metadata.created
    assert store.authenticate(secret).limits == Limits(0.5, 120)
    assert store.token(metadata.token_id).limits == Limits(0.5, 120)
    assert store.set_limits(metadata.token_id, Limits(requests_per_second=3)).limits == Limits(3.0, None)
    store.revoke(metadata.token_id)
    assert store.set_limits(metadata.token_id, Limits(1, 1)) is None
    assert store.set_limits(987654, Limits(1, 1)) is None


@pytest.mark.parametrize(
    "limits", [dict(requests_per_second=0), dict(requests_per_second=float("nan")), dict(tokens_per_minute=-1)]
)
def test_limits_must_be_positive(limits):
    with pytest.raises(ValueError):
        Limits(**limits)


def test_add_usage_accumulates_and_sets_last_used(store):
    store.add_user("a@example.com", "client", None)
    first, _ = store.create_token("a@example.com", "one")
    second, _ = store.create_token("a@example.com", "two")
    idle, _ = store.create_token("a@example.com", "idle")
    t1 = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    t2 = t1 + timedelta(seconds=7)
    store.add_usage({first.token_id: Usage(2, 5, 40), second.token_id: Usage(1, 1, 3)}, t1)
    # Another time zone is the same instant: stored and returned as UTC.
    store.add_usage({first.token_id: Usage(1, 2, 10)}, t2.astimezone(timezone(timedelta(hours=2))))
    assert store.token(first.token_id).usage == Usage(3, 7, 50)
    assert store.token(first.token_id).last_used == t2
    assert store.token(second.token_id).usage == Usage(1, 1, 3) and store.token(second.token_id).last_used == t1
    assert store.token(idle.token_id).usage == Usage() and store.token(idle.token_id).last_used is None
    assert store.token(first.token_id).to_json() == {
        "token_id": first.token_id,
        "description": "one",
        "created": first.created.isoformat().replace("+00:00", "Z"),
        "last_used": "2030-01-02T03:04:12.123456Z",
        "user": "a@example.com",
        "limits": {"requests_per_second": None, "tokens_per_minute": None},
        "usage": {"requests": 3, "texts": 7, "prompt_tokens": 50},
    }
    with pytest.raises(ValueError):
        store.add_usage({first.token_id: Usage(1, 1, 1)}, datetime(2030, 1, 1))


def test_concurrent_calls_from_threads(store):
    store.add_user("a@example.com", "client", None)
    metadata, secret = store.create_token("a@example.com", "busy")

    def work(_: int) -> bool:
        store.add_usage({metadata.token_id: Usage(1, 2, 3)}, datetime.now(UTC))
        return store.authenticate(secret).token_id == metadata.token_id

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(200)))
    assert store.token(metadata.token_id).usage == Usage(200, 400, 600)


def test_two_stores_on_one_database_see_each_other(location):
    first, second = open_store(location), open_store(location)
    try:
        first.add_user("a@example.com", "client", None)
        metadata, secret = second.create_token("a@example.com", "shared")
        assert first.authenticate(secret).token_id == metadata.token_id
        assert second.authenticate(secret).token_id == metadata.token_id
        assert first.revoke(metadata.token_id)
        assert second.authenticate(secret) is None
        assert second.revoke(metadata.token_id) is False
    finally:
        first.close()
        second.close()


def test_concurrent_opens_create_the_schema_once(location):
    with ThreadPoolExecutor(6) as pool:
        stores = list(pool.map(lambda _: open_store(location), range(6)))
    try:
        stores[0].add_user("a@example.com", "client", None)
        assert [store.user("a@example.com").email for store in stores] == ["a@example.com"] * 6
    finally:
        for store in stores:
            store.close()


def test_opening_twice_keeps_the_data(location):
    store = open_store(location)
    store.add_user("a@example.com", "client", None)
    _, secret = store.create_token("a@example.com", "x")
    store.close()
    reopened = open_store(location)
    assert reopened.authenticate(secret).user_email == "a@example.com"
    reopened.close()


# Outages


def test_unwritable_sqlite_path_is_unavailable(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(StoreUnavailable):
        open_store(tmp_path / "a-file" / "tokens.db")
    with pytest.raises(StoreUnavailable):
        open_store(tmp_path)  # a directory, not a database file


def test_unreachable_postgres_is_unavailable_quickly():
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        open_store(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
    assert time.monotonic() - started < 5


@pytest.mark.e2e
def test_postgres_outage_and_recovery():
    server = PostgresServer()
    try:
        store = open_store(server.url)
        store.add_user("a@example.com", "client", None)
        _, secret = store.create_token("a@example.com", "x")
        store.ping()

        server.kill()
        with pytest.raises(StoreUnavailable) as raised:
            store.authenticate(secret)
        assert secret[4:] not in str(raised.value)
        with pytest.raises(StoreUnavailable):
            store.ping()

        # The broken connection is replaced once the server is back; committed data survived the crash.
        server.restart()
        store.ping()
        assert store.authenticate(secret).user_email == "a@example.com"

        server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.ping()
        with pytest.raises(StoreUnavailable):
            store.authenticate(secret)
        assert time.monotonic() - started < 5
        store.close()
    finally:
        server.stop()

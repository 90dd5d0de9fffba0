"""Users and API tokens for the gateway's authentication, kept in SQLite (one file) or PostgreSQL (shared by replicas).

The API is synchronous: the gateway calls it through asyncio.to_thread. Both backends run the same SQL, written
with ? placeholders; a backend only says how to connect, how to run a transaction and which column types it has.

Secrets are minted here, handed to the caller once and never stored: the database keeps their SHA-256 only.
Passwords are kept as argon2id hashes.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import os
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import argon2
import psycopg

ROLES = ("admin", "client")
TOKEN_PREFIX = "emb_"
# 32 random bytes: 256 bits of entropy, 43 characters of URL-safe base64 (no padding).
_SECRET_BYTES = 32
_SECRET_LENGTH = len(TOKEN_PREFIX) + math.ceil(_SECRET_BYTES * 4 / 3)
# A dead PostgreSQL must answer "unavailable" within seconds, not hang the request that asked.
CONNECT_TIMEOUT_S = 3
SQLITE_BUSY_TIMEOUT_MS = 5000


class StoreUnavailable(Exception):
    """The database cannot be reached or refused to work; the caller should answer 503, not 401."""


class UserExists(Exception):
    pass


class UnknownUser(Exception):
    pass


@dataclass(frozen=True)
class Limits:
    requests_per_second: float | None = None  # None = unlimited
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        rate = self.requests_per_second
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise ValueError("requests_per_second must be a positive number or None")
        if self.tokens_per_minute is not None and self.tokens_per_minute <= 0:
            raise ValueError("tokens_per_minute must be a positive integer or None")


@dataclass(frozen=True)
class Usage:
    requests: int = 0
    texts: int = 0
    prompt_tokens: int = 0


@dataclass(frozen=True)
class User:
    id: int
    email: str
    role: str


@dataclass(frozen=True)
class TokenMetadata:
    token_id: int
    user_email: str
    description: str
    created: datetime  # timezone-aware UTC
    last_used: datetime | None
    limits: Limits
    usage: Usage

    def to_json(self) -> dict:
        return {
            "token_id": self.token_id,
            "description": self.description,
            "created": _iso(self.created),
            "last_used": None if self.last_used is None else _iso(self.last_used),
            "user": self.user_email,
            "limits": {
                "requests_per_second": self.limits.requests_per_second,
                "tokens_per_minute": self.limits.tokens_per_minute,
            },
            "usage": {"requests": self.usage.requests, "texts": self.usage.texts, "prompt_tokens": self.usage.prompt_tokens},
        }


@dataclass(frozen=True)
class Principal:
    """What a valid bearer token resolves to."""

    token_id: int
    user_email: str
    role: str
    limits: Limits


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime | str) -> datetime:
    """A timestamp read back: psycopg gives an aware datetime in the session's time zone, SQLite the ISO text written."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return moment.astimezone(UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _secret_digest(secret: str) -> str:
    # A fast hash is right for these secrets, unlike for passwords: 256 random bits cannot be brute-forced from a leaked
    # hash however fast the hash is, and a deterministic hash can be found through a unique index (GitHub and Stripe
    # store their API tokens the same way). A salted KDF would need a scan over every token on every request.
    return hashlib.sha256(secret.encode()).hexdigest()


def _well_formed(secret: object) -> bool:
    """Rejects what this module never minted before touching the database (and before encode() can fail)."""
    return isinstance(secret, str) and len(secret) == _SECRET_LENGTH and secret.isascii() and secret.startswith(TOKEN_PREFIX)


@functools.cache
def _dummy_password_hash() -> str:
    """login() verifies against this when there is no hash to verify, so that a miss takes as long as a wrong password."""
    return argon2.PasswordHasher().hash(secrets.token_urlsafe(16))


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS users (
        id {id},
        email TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ({roles})),
        password_hash TEXT,
        created {timestamp} NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS tokens (
        id {id},
        user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        secret_sha256 TEXT NOT NULL UNIQUE,
        description TEXT NOT NULL,
        created {timestamp} NOT NULL,
        last_used {timestamp},
        revoked {timestamp},
        requests_per_second DOUBLE PRECISION,
        tokens_per_minute BIGINT,
        requests BIGINT NOT NULL DEFAULT 0,
        texts BIGINT NOT NULL DEFAULT 0,
        prompt_tokens BIGINT NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS tokens_user_id ON tokens (user_id)",
)

# Joining users means a token whose user was deleted is never served, even where ON DELETE CASCADE is not enforced.
_LIVE_TOKENS = """SELECT t.id, u.email, t.description, t.created, t.last_used, t.requests_per_second, t.tokens_per_minute,
    t.requests, t.texts, t.prompt_tokens
    FROM tokens t JOIN users u ON u.id = t.user_id WHERE t.revoked IS NULL"""


def _metadata(row: tuple) -> TokenMetadata:
    token_id, email, description, created, last_used, rate, tokens_per_minute, requests, texts, prompt_tokens = row
    return TokenMetadata(
        token_id,
        email,
        description,
        _utc(created),
        None if last_used is None else _utc(last_used),
        Limits(rate, tokens_per_minute),
        Usage(requests, texts, prompt_tokens),
    )


class _Transaction:
    """Runs this module's SQL (? placeholders) on one backend's cursor, inside one transaction."""

    def __init__(self, cursor: Any, placeholder: str, adapt: Callable[[Any], Any] = lambda value: value) -> None:
        self._cursor = cursor
        self._placeholder = placeholder
        self._adapt = adapt

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        cursor = self._cursor.execute(sql.replace("?", self._placeholder), [self._adapt(value) for value in params])
        return cursor.fetchall() if cursor.description else []


@contextmanager
def _unavailable_on(errors: tuple[type[BaseException], ...], what: str) -> Iterator[None]:
    # Driver messages name the server, the file or the SQL error, never the parameters, so no secret can leak through.
    try:
        yield
    except errors as exc:
        raise StoreUnavailable(f"{what}: {exc}") from exc


class TokenStore(ABC):
    """Users and their tokens. Thread-safe: every call is one transaction under the store's lock."""

    # The column types that differ between the backends, filled into _SCHEMA.
    _ID_COLUMN: str
    _TIMESTAMP_COLUMN: str
    # Statements run before the schema in the same transaction, to keep two processes from creating it at once.
    _SCHEMA_GUARD: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hasher = argon2.PasswordHasher()

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[_Transaction]:
        """One transaction, committed when the block ends normally; connection-level errors raise StoreUnavailable."""

    @abstractmethod
    def close(self) -> None: ...

    def _create_schema(self) -> None:
        roles = ", ".join(f"'{role}'" for role in ROLES)
        with self._transaction() as tx:
            for statement in self._SCHEMA_GUARD + _SCHEMA:
                tx.rows(statement.format(id=self._ID_COLUMN, timestamp=self._TIMESTAMP_COLUMN, roles=roles))

    def _hash_password(self, password: str) -> str:
        if not password:
            raise ValueError("password must not be empty")
        return self._hasher.hash(password)

    def add_user(self, email: str, role: str, password: str | None) -> User:
        """password None makes a user that has tokens but cannot log in."""
        if not email.strip():
            raise ValueError("email must not be empty")
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        password_hash = None if password is None else self._hash_password(password)
        with self._transaction() as tx:
            rows = tx.rows(
                "INSERT INTO users (email, role, password_hash, created) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (email) DO NOTHING RETURNING id",
                (email, role, password_hash, _now()),
            )
        if not rows:
            raise UserExists(email)
        return User(rows[0][0], email, role)

    def set_password(self, email: str, password: str) -> None:
        password_hash = self._hash_password(password)
        with self._transaction() as tx:
            if not tx.rows("UPDATE users SET password_hash = ? WHERE email = ? RETURNING id", (password_hash, email)):
                raise UnknownUser(email)

    def user(self, email: str) -> User | None:
        with self._transaction() as tx:
            rows = tx.rows("SELECT id, email, role FROM users WHERE email = ?", (email,))
        return User(*rows[0]) if rows else None

    def users(self) -> list[User]:
        with self._transaction() as tx:
            return [User(*row) for row in tx.rows("SELECT id, email, role FROM users ORDER BY id")]

    def login(self, email: str, password: str) -> User | None:
        with self._transaction() as tx:
            rows = tx.rows("SELECT id, role, password_hash FROM users WHERE email = ?", (email,))
        stored = rows[0][2] if rows else None
        # Hashing happens outside the lock: it takes tens of milliseconds and must not hold up token lookups.
        try:
            self._hasher.verify(stored or _dummy_password_hash(), password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return None
        if stored is None:
            return None
        if self._hasher.check_needs_rehash(stored):
            # Only replaces the hash just verified, so a set_password() in between is not undone.
            with self._transaction() as tx:
                tx.rows(
                    "UPDATE users SET password_hash = ? WHERE email = ? AND password_hash = ?",
                    (self._hasher.hash(password), email, stored),
                )
        return User(rows[0][0], email, rows[0][1])

    def create_token(self, email: str, description: str, limits: Limits = Limits()) -> tuple[TokenMetadata, str]:
        """The new token and its secret; the secret cannot be read back later."""
        secret = TOKEN_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        created = _now()
        with self._transaction() as tx:
            rows = tx.rows(
                "INSERT INTO tokens (user_id, secret_sha256, description, created, requests_per_second, tokens_per_minute) "
                "SELECT id, ?, ?, ?, ?, ? FROM users WHERE email = ? RETURNING id",
                (_secret_digest(secret), description, created, limits.requests_per_second, limits.tokens_per_minute, email),
            )
        if not rows:
            raise UnknownUser(email)
        return TokenMetadata(rows[0][0], email, description, created, None, limits, Usage()), secret

    def authenticate(self, secret: str) -> Principal | None:
        """The live token this secret belongs to, or None."""
        if not _well_formed(secret):
            return None
        digest = _secret_digest(secret)
        with self._transaction() as tx:
            rows = tx.rows(
                "SELECT t.id, t.secret_sha256, u.email, u.role, t.requests_per_second, t.tokens_per_minute "
                "FROM tokens t JOIN users u ON u.id = t.user_id WHERE t.secret_sha256 = ? AND t.revoked IS NULL",
                (digest,),
            )
        if not rows:
            return None
        token_id, stored, email, role, rate, tokens_per_minute = rows[0]
        # The database's equality test is not constant time and may follow a collation; this comparison is both exact
        # and constant time, so the decision itself leaks nothing about how close a guess came.
        if not hmac.compare_digest(stored, digest):
            return None
        return Principal(token_id, email, role, Limits(rate, tokens_per_minute))

    def tokens(self, email: str | None) -> list[TokenMetadata]:
        """The live tokens of one user, or of everyone when email is None."""
        sql, params = (_LIVE_TOKENS, ()) if email is None else (_LIVE_TOKENS + " AND u.email = ?", (email,))
        with self._transaction() as tx:
            return [_metadata(row) for row in tx.rows(sql + " ORDER BY t.id", params)]

    def token(self, token_id: int) -> TokenMetadata | None:
        with self._transaction() as tx:
            rows = tx.rows(_LIVE_TOKENS + " AND t.id = ?", (token_id,))
        return _metadata(rows[0]) if rows else None

    def revoke(self, token_id: int) -> bool:
        """False when the token is unknown or already revoked. The row stays, marked, so its usage remains on record."""
        with self._transaction() as tx:
            revoked = tx.rows("UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL RETURNING id", (_now(), token_id))
        return bool(revoked)

    def set_limits(self, token_id: int, limits: Limits) -> TokenMetadata | None:
        with self._transaction() as tx:
            tx.rows(
                "UPDATE tokens SET requests_per_second = ?, tokens_per_minute = ? WHERE id = ? AND revoked IS NULL",
                (limits.requests_per_second, limits.tokens_per_minute, token_id),
            )
            rows = tx.rows(_LIVE_TOKENS + " AND t.id = ?", (token_id,))
        return _metadata(rows[0]) if rows else None

    def add_usage(self, usage: dict[int, Usage], used_at: datetime) -> None:
        """Adds to the counters in the database rather than writing totals, so that several gateways can share a token."""
        if used_at.tzinfo is None:
            raise ValueError("used_at must be timezone-aware")
        used_at = used_at.astimezone(UTC)
        with self._transaction() as tx:
            for token_id, used in usage.items():
                tx.rows(
                    "UPDATE tokens SET requests = requests + ?, texts = texts + ?, prompt_tokens = prompt_tokens + ?, "
                    "last_used = ? WHERE id = ?",
                    (used.requests, used.texts, used.prompt_tokens, used_at, token_id),
                )

    def ping(self) -> None:
        """Raises StoreUnavailable when the database does not answer."""
        with self._transaction() as tx:
            tx.rows("SELECT 1")


def _sqlite_value(value: Any) -> Any:
    # Python's implicit datetime adapter for sqlite3 is deprecated; timestamps are written as ISO 8601 text explicitly.
    return value.isoformat() if isinstance(value, datetime) else value


def _enable_wal(connection: sqlite3.Connection) -> None:
    # Switching to WAL needs the file to itself, and SQLite answers "locked" at once, without busy_timeout, when another
    # process opens the same new file at that moment. The mode is stored in the file, so only the first opens can race.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            # Extended result codes (SQLITE_BUSY_RECOVERY, ...) keep the primary code in the low byte.
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _owner_only(path: Path) -> None:
    """Creates the database file readable and writable by its owner only, and takes group and other access from one
    (with its -wal and -shm files) that an older version created world-readable. SQLite gives the -wal and -shm files
    it creates the database file's mode. A file of another user is left as it is: its owner chose its mode."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(descriptor)
    for companion in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            status = companion.stat()
        except FileNotFoundError:
            continue
        if status.st_uid == os.geteuid() and status.st_mode & 0o077:
            companion.chmod(0o600)


class SqliteTokenStore(TokenStore):
    _ID_COLUMN = "INTEGER PRIMARY KEY AUTOINCREMENT"  # AUTOINCREMENT: an id is never handed out twice
    _TIMESTAMP_COLUMN = "TEXT"  # SQLite has no timestamp type: ISO 8601, always UTC

    def __init__(self, path: Path) -> None:
        super().__init__()
        with _unavailable_on((OSError, sqlite3.OperationalError), f"cannot open SQLite database {path}"):
            # The store holds password hashes and usage: no one but the gateway's user has business reading it.
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _owner_only(path)
            # One connection for all threads, serialized by the lock; isolation_level=None leaves BEGIN/COMMIT to us.
            self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            # busy_timeout waits for other processes' locks instead of failing. WAL: a commit appends to the log rather than
            # rewriting pages, and readers outside this module (sqlite3 shell, backups) do not block the gateway's writes.
            self._connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            _enable_wal(self._connection)
            self._connection.execute("PRAGMA foreign_keys = ON")

    @contextmanager
    def _transaction(self) -> Iterator[_Transaction]:
        with self._lock, _unavailable_on((sqlite3.OperationalError,), "SQLite"):
            # IMMEDIATE takes the write lock up front, where SQLite waits for it (busy_timeout). A deferred transaction that
            # read first would fail at once with "database is locked" on its first write if another process wrote meanwhile.
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield _Transaction(self._connection.cursor(), "?", _sqlite_value)
            except BaseException:
                # Some errors (disk full, I/O) have already rolled the transaction back.
                if self._connection.in_transaction:
                    self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._connection.close()


class PostgresTokenStore(TokenStore):
    _ID_COLUMN = "INTEGER GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"  # INTEGER: the contract's token ids are int32
    _TIMESTAMP_COLUMN = "TIMESTAMPTZ"
    # CREATE TABLE IF NOT EXISTS is not safe against a concurrent CREATE in PostgreSQL; the lock (any fixed key, held
    # until commit) makes a second gateway wait and then find the tables.
    _SCHEMA_GUARD = ("SELECT pg_advisory_xact_lock(7310575180862611303)",)

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url
        self._connection: psycopg.Connection | None = None

    def _connected(self) -> psycopg.Connection:
        # A connection the server dropped (restart, failover) reads as closed: open a new one rather than fail forever.
        if self._connection is None or self._connection.closed:
            self._connection = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        return self._connection

    @contextmanager
    def _transaction(self) -> Iterator[_Transaction]:
        # The URL is not in the message: it may carry a password.
        with self._lock, _unavailable_on((psycopg.OperationalError, psycopg.InterfaceError), "PostgreSQL"):
            connection = self._connected()
            with connection.transaction(), connection.cursor() as cursor:
                yield _Transaction(cursor, "%s")

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()


def open_store(location: str | Path) -> TokenStore:
    """A PostgreSQL URL (postgresql:// or postgres://) or a SQLite file path; creates the schema if missing."""
    text = str(location)
    store = PostgresTokenStore(text) if text.startswith(("postgresql://", "postgres://")) else SqliteTokenStore(Path(location))
    try:
        store._create_schema()
    except BaseException:
        store.close()
        raise
    return store

"""Every setting is a CLI flag and an EMBED_* environment variable; the flag wins."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# The checkout (or the image's /app): gateway/ops/settings.py is three levels down.
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int = 50051
    workers: int = 1
    model_repository: Path = ROOT / "model_repository"
    triton_url: str = ""
    triton_dns_refresh_s: float = 5.0
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    triton_admin_key: str = field(default="", repr=False)  # a secret: kept out of any printed Settings
    run_dir: Path = ROOT / ".run"
    max_body_bytes: int = 4 * 1024 * 1024
    max_inputs: int = 2048
    max_pending_texts: int = 32768
    max_rows_in_flight: int = 128
    max_calls_per_lane: int = 4
    request_timeout_s: float = 30.0
    triton_stall_restart_s: float = 10.0
    shutdown_grace_s: float = 15.0
    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_connections: int = 0
    grpc_max_connections: int = 0
    grpc_handshake_timeout_s: float = 10.0
    truncate: bool = False
    cache_url: str = ""
    cache_ttl_s: int = 86400
    cache_max_bytes: int = 1024**3
    auth: bool = False
    auth_database: str = ""
    allow_unauthenticated: bool = False
    metrics_auth: bool = False
    log_level: str = "INFO"
    log_format: str = "text"

    @property
    def auth_store_location(self) -> str:
        return auth_store_location(self.run_dir, self.auth_database)

    def __repr__(self) -> str:
        # Settings printed or logged whole show what redacted_setting lets through, as --help does.
        shown = (
            f"{f.name}={redacted_setting(f.name, value)!r}"
            if isinstance(value := getattr(self, f.name), str)
            else f"{f.name}={value!r}"
            for f in fields(self)
        )
        return f"Settings({', '.join(shown)})"


HELP = {
    "host": "address the HTTP and gRPC listeners bind to",
    "http_port": "HTTP port of the gateway",
    "grpc_port": "gRPC port of the gateway",
    "workers": "gateway processes that share the HTTP and gRPC ports, so that the gateway uses more than one core; "
    "one parent process starts and supervises Triton and them. --max-pending-texts, --max-rows-in-flight and each "
    "token's rate limits are split evenly between the workers, so that the host as a whole keeps them",
    "model_repository": "Triton model repository written by `python -m export`",
    "triton_url": "host:grpc_port of running Tritons to use instead of starting one, comma-separated; a DNS name stands for "
    "every address it resolves to (a Kubernetes headless Service), and calls go to the least loaded ready one",
    "triton_dns_refresh_s": "how often the names in --triton-url are resolved again, so Tritons that come and go are followed",
    "triton_http_port": "HTTP port of the Triton the gateway starts",
    "triton_grpc_port": "gRPC port of the Triton the gateway starts",
    "triton_metrics_port": "metrics port of the Triton the gateway starts",
    "triton_admin_key": "key that Triton's model control, shared-memory, trace and logging APIs require (HTTP header "
    "admin-key, gRPC metadata triton-grpc-protocol-admin-key) on the Triton started here; empty: a random one per start. Either way it is in "
    "triton-admin-key in --run-dir while Triton runs; set it (from a secret, by the environment) to call them from elsewhere",
    "run_dir": "where logs of the started Triton go",
    "max_body_bytes": "largest request body; larger ones get 413 before any work is done",
    "max_inputs": "most texts in one request; each is one row in Triton's batches",
    "max_pending_texts": "texts admitted and not yet answered, a bound on memory; requests past it, or that the backlog "
    "cannot serve before their deadline, get 429 with Retry-After from the measured throughput instead of queueing",
    "max_rows_in_flight": "rows sent to each ready Triton at once; more batches better on a fast encoder, fewer lets a one-text request "
    "overtake a big one sooner",
    "max_calls_per_lane": "Triton calls in flight at once per ensemble, priority and ready Triton; requests that arrive meanwhile share "
    "the next call. More keeps more of Triton's steps busy at once, fewer makes bigger batches",
    "request_timeout_s": "deadline of every request (a gRPC deadline or the X-Request-Timeout header may ask for less); "
    "past it the caller gets 503 / DEADLINE_EXCEEDED and Triton drops the work",
    "triton_stall_restart_s": "how long the Triton the gateway started may stay unready (stalled, stuck loading) before it is "
    "restarted; too short restarts a Triton that would have recovered",
    "shutdown_grace_s": "on SIGTERM, how long calls in flight may run on before they are cancelled and Triton is stopped",
    "header_timeout_s": "time a connection has to send its request headers (from opening, or from its previous response); "
    "longer tolerates slower clients, shorter frees slow-header connections sooner",
    "max_header_bytes": "request line and headers together; past it 431 and the connection is closed",
    "max_headers": "header lines per request; past it 431 and the connection is closed",
    "max_connections": "open HTTP connections at most (0: the open-file limit, raised to its hard limit, less a reserve "
    "and the gRPC port's share); "
    "a new one over the cap replaces the one waiting longest for its headers",
    "grpc_max_connections": "open gRPC connections at most (0: a quarter of the descriptors HTTP's cap is derived from, "
    "at 3 per relayed connection); a new one over the cap replaces the one waiting longest for its HTTP/2 preface",
    "grpc_handshake_timeout_s": "time a gRPC connection has to send its HTTP/2 preface, and then its settings; then it is "
    "closed. Longer tolerates slower clients, shorter frees idle connections sooner",
    "truncate": "cut texts longer than the model's limit instead of answering 400 (a request may also ask per call)",
    "cache_url": "redis:// URL of an embedding cache that replicas share (empty: no cache); a text embedded before is "
    "answered from it without Triton, and a cache that is down only costs the speed-up",
    "cache_ttl_s": "how long a cached embedding lives",
    "cache_max_bytes": "memory the cache's Redis may use, evicting the least recently used embeddings past it "
    "(set on the server at start; 0 leaves the server's own maxmemory)",
    "auth": "require an API token (Authorization: Bearer) on every route but the probes, /version and the login",
    "auth_database": "users and tokens: a SQLite file, or a postgresql:// URL that several replicas share "
    "(empty: auth.sqlite3 in --run-dir)",
    "allow_unauthenticated": "listen on a non-loopback --host without --auth (only behind something that authenticates callers)",
    "metrics_auth": "with --auth, require a token on /metrics too",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "text, or json for one JSON object per line",
}


def auth_store_location(run_dir: Path, auth_database: str) -> str:
    return auth_database or str(run_dir / "auth.sqlite3")


HIDDEN = "(set, not shown)"
MASK = "***"
# A setting whose name says that its whole value is a secret (besides those declared with repr=False).
_SECRET_NAME = re.compile(r"(^|_)(key|secret|password|passwd|token|credentials?)(_|$)")
# A parameter that carries a secret, in a URL's query (redis://host?password=...) or a libpq-style string
# (host=... password=...).
_SECRET_PARAMETER = re.compile(r"(?i)((?:^|[?&;\s])[\w.-]*(?:password|passwd|pwd|secret|token|key)=)([^&;\s#]*)")


def redacted_setting(name: str, value: object) -> str:
    """The value of the setting `name` fit to print: in --help, the startup banner and any log or repr of the settings.

    A secret setting (declared with repr=False, or named like a key, token or password) shows only that it is set. In
    any other string a URL's password and the secret-looking parameters of its query are masked: the scheme, user,
    host and database stay readable (postgresql://app:***@db:5432/tokens, redis://:***@cache:6379/0).
    """
    if not isinstance(value, str):
        return str(value)
    if value and (name in _DECLARED_SECRET or _SECRET_NAME.search(name)):
        return HIDDEN
    scheme, separator, rest = value.partition("://")
    if separator:
        # The credentials end at the last @ of the authority, which ends at the query or fragment; a password that
        # holds an unescaped ?, # or / ends it too soon, so an @ past it still counts: better hide too much than leak.
        ends = [i for i in (rest.find("?"), rest.find("#")) if i >= 0]
        at = rest.rfind("@", 0, min(ends, default=len(rest)))
        if at < 0:
            at = rest.rfind("@")
        if at >= 0 and ":" in rest[:at]:
            rest = f"{rest[:at].split(':', 1)[0]}:{MASK}{rest[at:]}"
        value = f"{scheme}{separator}{rest}"
    return _SECRET_PARAMETER.sub(lambda match: match.group(1) + MASK, value)


_DECLARED_SECRET = frozenset(f.name for f in fields(Settings) if not f.repr)


def _env_name(field_name: str) -> str:
    return f"EMBED_{field_name.upper()}"


def _parse_bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _kind(default: object) -> Callable[[str], Any]:
    """What turns a flag's or a variable's text into the setting's type."""
    if isinstance(default, Path):
        return Path
    if isinstance(default, bool):  # before int: a bool is an int
        return _parse_bool
    if isinstance(default, int | float):
        return type(default)
    return str


def parse_settings(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="python -m gateway", description="Serve embeddings over HTTP and gRPC from Triton.")
    for setting in fields(Settings):
        flag = "--" + setting.name.replace("_", "-")
        kind = _kind(setting.default)
        env_value = environ.get(_env_name(setting.name))
        default = kind(env_value) if env_value is not None else setting.default
        # argparse expands %-formats in help: a % of the value (a URL-escaped character) is written %%.
        shown = redacted_setting(setting.name, default).replace("%", "%%")
        help_text = f"{HELP[setting.name]} (env {_env_name(setting.name)}, default {shown})"
        if kind is _parse_bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)
    return Settings(**vars(parser.parse_args(argv)))

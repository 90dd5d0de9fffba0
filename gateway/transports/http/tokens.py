"""The Aleph Alpha contract's login and API-token routes, and the admin's routes over everyone's tokens.

- POST /get_token {email, password} -> {token, role}: the login. The contract document names no path; this is
  the one the published aleph-alpha-client called (AlephAlphaClient.get_token, "get_token" with that body).
  Each login mints an API token described as a login, listed and revocable like any other.
- GET/POST /users/me/tokens and DELETE /users/me/tokens/{token_id}: the caller's own tokens. The token itself is
  shown once, in the answer that creates it; listings hold metadata only.
- GET/POST /users/{email}/tokens, PATCH/DELETE /users/{email}/tokens/{token_id}: any user's tokens, for admins,
  who alone set a token's rate limits.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, StrictStr, TypeAdapter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.auth.authenticator import Authenticator, forbidden, unauthenticated
from gateway.auth.store import Limits, Principal
from gateway.core.errors import ErrorKind, ServiceError, invalid
from gateway.transports.http.aleph_alpha import render_error
from gateway.transports.http.messages import contract_errors, json_response, parse_body

MAX_DESCRIPTION_CHARS = 200
MAX_TOKEN_ID = 2**31 - 1  # the contract's token_id is an int32


class LimitsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests_per_second: float | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)

    def limits(self) -> Limits:
        return Limits(self.requests_per_second, self.tokens_per_minute)


class LoginBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    email: StrictStr = Field(max_length=320)
    password: StrictStr = Field(max_length=1024)


class CreateTokenBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    description: StrictStr = Field(max_length=MAX_DESCRIPTION_CHARS)
    limits: LimitsBody | None = None


class UpdateTokenBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    limits: LimitsBody


ADAPTERS = {cls: TypeAdapter(cls) for cls in (LoginBody, CreateTokenBody, UpdateTokenBody)}
AUTH_OFF = "token management needs authentication; start the gateway with --auth (EMBED_AUTH=1)"


def _caller(request: Request) -> Principal:
    return request.state.principal


def _require_admin(request: Request) -> Principal:
    caller = _caller(request)
    if caller.role != "admin":
        raise forbidden("only an admin may manage other users' tokens or set rate limits")
    return caller


def _token_id(request: Request) -> int:
    raw = request.path_params["token_id"]
    if not raw.isdigit() or int(raw) > MAX_TOKEN_ID:
        raise invalid(f"token_id must be a positive integer, got {raw!r}", "token_id")
    return int(raw)


ROUTES = [
    ("/get_token", ["POST"]),
    ("/users/me/tokens", ["GET", "POST"]),
    ("/users/me/tokens/{token_id}", ["DELETE"]),
    ("/users/{email}/tokens", ["GET", "POST"]),
    ("/users/{email}/tokens/{token_id}", ["PATCH", "DELETE"]),
]
# Managing tokens is not embedding work: a token over its rate limit must still be able to list, create and revoke
# tokens, so these routes are not counted against it (gateway/transports/policy.py).
UNMETERED_ROUTES = frozenset(path for path, _ in ROUTES)


@contract_errors(render_error)
async def _auth_off(request: Request):
    raise ServiceError(ErrorKind.NOT_FOUND, AUTH_OFF)


def routes(authenticator: Authenticator | None, max_body_bytes: int) -> list[Route]:
    """The routes; without authentication each answers 404 saying how to turn it on."""
    if authenticator is None:
        return [Route(path, _auth_off, methods=methods) for path, methods in ROUTES]
    endpoints = _endpoints(authenticator, max_body_bytes)
    return [Route(path, endpoint, methods=methods) for (path, methods), endpoint in zip(ROUTES, endpoints)]


def _endpoints(authenticator: Authenticator, max_body_bytes: int) -> list:
    store = authenticator.store
    store_call = authenticator.call_store

    async def parse(request: Request, cls):
        return await parse_body(request, ADAPTERS[cls], max_body_bytes)

    async def listing(email: str) -> Response:
        return json_response([token.to_json() for token in await authenticator.with_usage(store.tokens, email)])

    async def create(request: Request, email: str) -> Response:
        body = await parse(request, CreateTokenBody)
        limits = Limits()
        if body.limits is not None:
            _require_admin(request)
            limits = body.limits.limits()
        metadata, secret = await store_call(store.create_token, email, body.description, limits)
        return json_response({"metadata": metadata.to_json(), "token": secret})

    async def revoke(request: Request, email: str) -> Response:
        token_id = _token_id(request)
        token = await store_call(store.token, token_id)
        # Another user's token answers as an unknown one: ids are guessable, their existence is not anyone's business.
        if token is None or token.user_email != email or not await store_call(store.revoke, token_id):
            raise ServiceError(ErrorKind.NOT_FOUND, f"no token {token_id}", "token_id")
        authenticator.forget_cached()
        return Response(status_code=204)

    @contract_errors(render_error)
    async def login(request: Request):
        body = await parse(request, LoginBody)
        # The TCP peer, or what a trusted proxy says in X-Forwarded-For (uvicorn's FORWARDED_ALLOW_IPS, loopback only
        # by default): the login throttle counts failures per client address.
        user = await authenticator.login(body.email, body.password, request.client.host if request.client else None)
        if user is None:
            raise unauthenticated("wrong email or password")
        description = f"login {datetime.now(UTC).isoformat(timespec='seconds')}"
        _, secret = await store_call(store.create_token, user.email, description)
        return json_response({"token": secret, "role": user.role})

    @contract_errors(render_error)
    async def my_tokens(request: Request):
        email = _caller(request).user_email
        if request.method == "POST":
            return await create(request, email)
        return await listing(email)

    @contract_errors(render_error)
    async def my_token(request: Request):
        return await revoke(request, _caller(request).user_email)

    @contract_errors(render_error)
    async def user_tokens(request: Request):
        _require_admin(request)
        email = request.path_params["email"]
        if await store_call(store.user, email) is None:
            raise ServiceError(ErrorKind.NOT_FOUND, f"no user {email!r}", "email")
        if request.method == "POST":
            return await create(request, email)
        return await listing(email)

    @contract_errors(render_error)
    async def user_token(request: Request):
        _require_admin(request)
        email = request.path_params["email"]
        if request.method == "DELETE":
            return await revoke(request, email)
        token_id = _token_id(request)
        body = await parse(request, UpdateTokenBody)
        token = await store_call(store.token, token_id)
        if token is None or token.user_email != email:
            raise ServiceError(ErrorKind.NOT_FOUND, f"no token {token_id}", "token_id")
        updated = await authenticator.with_usage(store.set_limits, token_id, body.limits.limits())
        return json_response(updated.to_json())

    return [login, my_tokens, my_token, user_tokens, user_token]

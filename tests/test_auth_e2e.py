"""Authentication end to end: a real gateway with --auth over a real Triton, called by the real aleph-alpha-client,
openai and gRPC clients, with users and tokens bootstrapped by the admin CLI into the default SQLite store."""

from __future__ import annotations

import json
import sqlite3
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import grpc
import openai
import pytest
from aleph_alpha_client import Client, Prompt, SemanticEmbeddingRequest, SemanticRepresentation
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.servers import HttpApi, gateway_cli, start_service
from harness.waiting import wait_until
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

ADMIN, CLIENT = "admin@example.com", "client@example.com"
ADMIN_PASSWORD = "correct horse battery staple"
# Whose password the login flood tests guess, so that no other test's login meets the throttle.
GUESSED, GUESSED_PASSWORD = "guessed@example.com", "tr0ub4dor&3 but longer"
FLOODED, FLOODED_PASSWORD = "flooded@example.com", "another long passphrase"
TEXTS = ["A man is playing a guitar.", "The cat sits outside.", "A woman is slicing an onion."]


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("auth")
    where = f"--run-dir={run_dir}"
    gateway_cli("users", "add", ADMIN, "--role", "admin", "--password-stdin", where, stdin=ADMIN_PASSWORD + "\n")
    gateway_cli("users", "add", CLIENT, "--role", "client", where)
    for email, password in ((GUESSED, GUESSED_PASSWORD), (FLOODED, FLOODED_PASSWORD)):
        gateway_cli("users", "add", email, "--role", "client", "--password-stdin", where, stdin=password + "\n")
    tokens = {
        "admin": gateway_cli("tokens", "create", "--user", ADMIN, "--description", "bootstrap", where).strip(),
        "client": gateway_cli("tokens", "create", "--user", CLIENT, "--description", "tests", where).strip(),
        "limited": gateway_cli(
            "tokens", "create", "--user", CLIENT, "--description", "limited", "--requests-per-second", "0.5", where
        ).strip(),
    }
    service = start_service(run_dir, extra_args=["--auth"])
    try:
        yield service, tokens
    finally:
        service.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def embed_body(model_name: str, texts=TEXTS) -> dict:
    return {"model": model_name, "input": texts}


def stored_usage(service, token_id: int) -> dict[str, int]:
    """The usage of a token (revoked or not) as the gateway has written it to its store, read beside the gateway."""
    with closing(sqlite3.connect(f"file:{service.run_dir / 'auth.sqlite3'}?mode=ro", uri=True)) as store:
        row = store.execute("SELECT requests, texts, prompt_tokens FROM tokens WHERE id = ?", (token_id,)).fetchone()
    return dict(zip(("requests", "texts", "prompt_tokens"), row))


def wait_until_usage_is_written(service, tokens, user: str, token_id: int) -> None:
    """Until the gateway has written what it counted for the token to its store (it does every half second): the
    listing, which adds what is counted and not yet written to what the store holds, then shows what the store holds.
    Listed with the admin token, so that the listings are not counted on the token itself."""
    with HttpApi(service.http_url, headers=bearer(tokens["admin"])) as admin:

        def written() -> bool:
            listed = [t["usage"] for t in admin.get(f"/users/{user}/tokens").json() if t["token_id"] == token_id]
            return listed == [stored_usage(service, token_id)]

        wait_until(written, timeout_s=30, interval_s=0.1, what=f"the usage of token {token_id} to be written to the store")


def test_the_cli_prints_the_token_alone_and_it_has_256_bits(secured):
    _, tokens = secured
    for token in tokens.values():
        assert token.startswith("emb_") and "\n" not in token
        assert len(token) >= 4 + 43  # 32 random bytes in URL-safe base64


def test_the_real_clients_are_refused_without_a_valid_token_and_served_with_one(secured, model_name):
    service, tokens = secured
    for wrong in ("", "emb_not-a-token", tokens["client"] + "x"):
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(api_key=wrong or "-", base_url=f"{service.http_url}/v1", max_retries=0).embeddings.create(
                model=model_name, input=TEXTS
            )
        assert refused.value.status_code == 401
        assert refused.value.body["code"] == "unauthenticated" and refused.value.body["request_id"]
        with pytest.raises(PermissionError) as refused_aa:
            Client(token=wrong or "-", host=service.http_url).semantic_embed(
                SemanticEmbeddingRequest(prompt=Prompt.from_text(TEXTS[0]), representation=SemanticRepresentation.Symmetric),
                model=model_name,
            )
        assert refused_aa.value.args[0] == 401 and json.loads(refused_aa.value.args[1])["code"] == "UNAUTHENTICATED"

    served = openai.OpenAI(api_key=tokens["client"], base_url=f"{service.http_url}/v1", max_retries=0).embeddings.create(
        model=model_name, input=TEXTS
    )
    assert len(served.data) == 3 and len(served.data[0].embedding) == 384
    semantic = Client(token=tokens["client"], host=service.http_url).semantic_embed(
        SemanticEmbeddingRequest(prompt=Prompt.from_text(TEXTS[0]), representation=SemanticRepresentation.Symmetric),
        model=model_name,
    )
    assert len(semantic.embedding) == 384


def test_missing_credentials_get_a_401_with_the_bearer_challenge_on_every_protected_route(secured, model_name):
    service, _ = secured
    with HttpApi(service.http_url) as http:
        for method, path in [
            ("GET", "/v1/models"),
            ("GET", "/models_available"),
            ("POST", "/v1/embeddings"),
            ("POST", "/embed"),
            ("GET", "/users/me/tokens"),
            ("GET", "/metrics/nothing-here"),
        ]:
            response = http.request(method, path, json=embed_body(model_name))
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
        basic = http.get("/v1/models", headers={"Authorization": "Basic YWRtaW46YWRtaW4="})
        assert basic.status_code == 401 and "Bearer" in basic.json()["error"]["message"]
        # The probes, /version and /metrics (open by default) need no token.
        for path in ("/health", "/health/live", "/health/ready", "/version", "/metrics"):
            assert http.get(path).status_code == 200, path


def test_tokens_are_created_listed_and_revoked_through_the_contract_routes_and_never_shown_again(secured, model_name):
    service, tokens = secured
    seen: list[str] = []
    with HttpApi(service.http_url, headers=bearer(tokens["client"])) as http:
        created = http.post("/users/me/tokens", json={"description": "token used on my laptop"})
        assert created.status_code == 200, created.text
        new_token, metadata = created.json()["token"], created.json()["metadata"]
        assert metadata["description"] == "token used on my laptop" and isinstance(metadata["token_id"], int)

        used = http.post("/v1/embeddings", json=embed_body(model_name), headers=bearer(new_token))
        assert used.status_code == 200
        listed = http.get("/users/me/tokens")
        assert listed.status_code == 200
        mine = {token["token_id"]: token for token in listed.json()}
        assert metadata["token_id"] in mine and all("token" not in token for token in listed.json())
        assert mine[metadata["token_id"]]["usage"]["requests"] == 1
        seen += [used.text, listed.text]

        revoked = http.delete(f"/users/me/tokens/{metadata['token_id']}")
        assert revoked.status_code == 204
        after = http.post("/v1/embeddings", json=embed_body(model_name), headers=bearer(new_token))
        assert after.status_code == 401
        assert metadata["token_id"] not in {token["token_id"] for token in http.get("/users/me/tokens").json()}
        again = http.delete(f"/users/me/tokens/{metadata['token_id']}")
        assert again.status_code == 404 and again.json()["code"] == "NOT_FOUND"
        seen += [after.text, again.text]

    # Once its usage is written, the store must not hold the token either.
    wait_until(
        lambda: stored_usage(service, metadata["token_id"])["requests"] > 0,
        timeout_s=30,
        interval_s=0.1,
        what="the revoked token's usage to be written to the store",
    )
    assert all(new_token not in text for text in seen)
    stored = b"".join(path.read_bytes() for path in service.run_dir.glob("auth.sqlite3*"))
    assert stored and new_token.encode() not in stored and tokens["client"].encode() not in stored
    logged = (service.run_dir / "gateway.log").read_text()
    assert new_token not in logged and tokens["client"] not in logged


def test_a_client_cannot_manage_other_users_tokens_or_set_limits(secured):
    service, tokens = secured
    with HttpApi(service.http_url, headers=bearer(tokens["client"])) as http:
        assert http.get(f"/users/{ADMIN}/tokens").status_code == 403
        limited = http.post("/users/me/tokens", json={"description": "x", "limits": {"requests_per_second": 100}})
        assert limited.status_code == 403 and limited.json()["code"] == "FORBIDDEN"
    with HttpApi(service.http_url, headers=bearer(tokens["admin"])) as http:
        listed = http.get(f"/users/{CLIENT}/tokens")
        assert listed.status_code == 200 and {t["description"] for t in listed.json()} >= {"tests", "limited"}
        created = http.post(f"/users/{CLIENT}/tokens", json={"description": "by admin", "limits": {"tokens_per_minute": 1000}})
        assert created.status_code == 200 and created.json()["metadata"]["limits"]["tokens_per_minute"] == 1000
        token_id = created.json()["metadata"]["token_id"]
        updated = http.patch(f"/users/{CLIENT}/tokens/{token_id}", json={"limits": {"requests_per_second": 2}})
        assert updated.status_code == 200 and updated.json()["limits"] == {"requests_per_second": 2, "tokens_per_minute": None}
        assert http.delete(f"/users/{CLIENT}/tokens/{token_id}").status_code == 204


def test_login_with_email_and_password_returns_a_working_token_and_its_role(secured, model_name):
    service, _ = secured
    with HttpApi(service.http_url) as http:
        wrong = http.post("/get_token", json={"email": ADMIN, "password": "wrong"})
        assert wrong.status_code == 401 and wrong.json()["code"] == "UNAUTHENTICATED"
        unknown = http.post("/get_token", json={"email": "nobody@example.com", "password": ADMIN_PASSWORD})
        assert unknown.status_code == 401
        login = http.post("/get_token", json={"email": ADMIN, "password": ADMIN_PASSWORD})
        assert login.status_code == 200 and login.json()["role"] == "admin"
        served = http.post("/v1/embeddings", json=embed_body(model_name), headers=bearer(login.json()["token"]))
        assert served.status_code == 200


def test_a_rate_limited_token_gets_429_with_retry_after(secured, model_name):
    service, tokens = secured
    with HttpApi(service.http_url, headers=bearer(tokens["limited"])) as http:
        first = http.post("/v1/embeddings", json=embed_body(model_name))
        second = http.post("/v1/embeddings", json=embed_body(model_name))
        assert first.status_code == 200
        assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limited"
        # 0.5 requests per second: the next one is allowed about 2 s after the first.
        assert 1 <= int(second.headers["retry-after"]) <= 2
        # Other tokens are not affected.
        assert http.post("/v1/embeddings", json=embed_body(model_name), headers=bearer(tokens["client"])).status_code == 200
        time.sleep(int(second.headers["retry-after"]) + 0.1)
        assert http.post("/v1/embeddings", json=embed_body(model_name)).status_code == 200


def test_usage_counters_match_what_was_sent(secured, model_name):
    service, tokens = secured
    with HttpApi(service.http_url, headers=bearer(tokens["admin"])) as http:
        created = http.post("/users/me/tokens", json={"description": "usage"}).json()
        token, token_id = created["token"], created["metadata"]["token_id"]
        prompt_tokens = 0
        batches = [TEXTS, TEXTS[:1], TEXTS[:2]]
        for texts in batches:
            answer = http.post("/v1/embeddings", json=embed_body(model_name, texts), headers=bearer(token))
            prompt_tokens += answer.json()["usage"]["prompt_tokens"]
        semantic = http.post(
            "/semantic_embed",
            json={"model": model_name, "prompt": TEXTS[0], "representation": "symmetric"},
            headers=bearer(token),
        )
        prompt_tokens += semantic.json()["num_tokens_prompt_total"]
        refused = http.post("/v1/embeddings", json={"model": model_name, "input": []}, headers=bearer(token))
        assert refused.status_code == 400
        wait_until_usage_is_written(service, tokens, ADMIN, token_id)  # the listing is then read back from the store
        (usage,) = [t["usage"] for t in http.get("/users/me/tokens").json() if t["token_id"] == token_id]
    # The request refused with 400 is not one: only served requests count.
    assert usage == {"requests": 4, "texts": sum(map(len, batches)) + 1, "prompt_tokens": prompt_tokens}


def test_grpc_authenticates_from_the_authorization_metadata(secured, model_name):
    service, tokens = secured
    request = pb.EmbedRequest(model=model_name, inputs=TEXTS)
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for metadata in [(), (("authorization", "Bearer emb_wrong"),), (("authorization", "Basic YQ=="),)]:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Embed(request, metadata=metadata, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply, call = stub.Embed.with_call(
            request, metadata=(("authorization", f"Bearer {tokens['client']}"), ("x-request-id", "grpc-test-1")), timeout=30
        )
        assert len(reply.embeddings) == 3
        assert ("x-request-id", "grpc-test-1") in call.initial_metadata()
        limited = (("authorization", f"Bearer {tokens['limited']}"),)
        time.sleep(2.1)  # the limited token's bucket is full again
        stub.Embed(request, metadata=limited, timeout=30)
        with pytest.raises(grpc.RpcError) as throttled:
            stub.Embed(request, metadata=limited, timeout=30)
        assert throttled.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate limit" in throttled.value.details()
        # The health service stays open, as the HTTP probes do.
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_calls_are_counted_in_the_tokens_usage(secured, model_name):
    service, tokens = secured
    with HttpApi(service.http_url, headers=bearer(tokens["client"])) as http:
        created = http.post("/users/me/tokens", json={"description": "grpc usage"}).json()
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            metadata = (("authorization", f"Bearer {created['token']}"),)
            replies = [
                stub.Embed(pb.EmbedRequest(model=model_name, inputs=texts), metadata=metadata, timeout=30)
                for texts in (TEXTS, TEXTS[:1])
            ]
        wait_until_usage_is_written(service, tokens, CLIENT, created["metadata"]["token_id"])
        (usage,) = [t["usage"] for t in http.get("/users/me/tokens").json() if t["token_id"] == created["metadata"]["token_id"]]
    assert usage == {"requests": 2, "texts": 4, "prompt_tokens": sum(reply.usage.prompt_tokens for reply in replies)}


def test_request_ids_are_echoed_logged_and_in_error_bodies(secured, model_name):
    service, tokens = secured
    with HttpApi(service.http_url, headers=bearer(tokens["client"])) as http:
        kept = http.post("/v1/embeddings", json=embed_body(model_name), headers={"X-Request-Id": "trace-abc-123"})
        assert kept.headers["x-request-id"] == "trace-abc-123"
        minted = http.post("/semantic_embed", json={"model": model_name, "prompt": 3, "representation": "symmetric"})
        assert minted.status_code == 400
        assert minted.json()["request_id"] == minted.headers["x-request-id"] and len(minted.headers["x-request-id"]) == 32
        hostile = http.post("/v1/embeddings", json=embed_body(model_name), headers={"X-Request-Id": "a b\tc"})
        assert hostile.headers["x-request-id"] != "a b\tc"
    log = service.run_dir / "gateway.log"
    request_ids = ("trace-abc-123", minted.headers["x-request-id"], hostile.headers["x-request-id"])

    def all_logged() -> bool:
        text = log.read_text()
        return all(f"gateway.access [{request_id}]" in text for request_id in request_ids)

    wait_until(all_logged, timeout_s=30, what="the access lines of the three requests")
    lines = log.read_text().splitlines()
    access = [line for line in lines if "trace-abc-123" in line]
    assert access and any("status=200" in line and "texts=3" in line and "route=/v1/embeddings" in line for line in access)
    assert all(TEXTS[0] not in line for line in lines)


def test_a_post_that_is_not_json_gets_415_in_the_contract_shape(secured, model_name):
    service, tokens = secured
    body = json.dumps(embed_body(model_name))
    with HttpApi(service.http_url, headers=bearer(tokens["client"])) as http:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            openai_answer = http.post("/v1/embeddings", data=body, headers={"Content-Type": content_type})
            assert openai_answer.status_code == 415 and openai_answer.json()["error"]["code"] == "unsupported_media_type"
            aleph_answer = http.post("/semantic_embed", data=body, headers={"Content-Type": content_type})
            assert aleph_answer.status_code == 415 and aleph_answer.json()["code"] == "UNSUPPORTED_MEDIA_TYPE"
        assert (
            http.post("/v1/embeddings", data=body, headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200
        )


def test_the_token_store_files_are_readable_by_the_gateways_user_only(secured):
    service, _ = secured
    files = list(service.run_dir.glob("auth.sqlite3*"))
    assert service.run_dir / "auth.sqlite3" in files
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in files} == {path.name: 0o600 for path in files}


def admin_token(http: HttpApi, limits: dict, user: str = CLIENT) -> tuple[str, int]:
    """A token of `user` with `limits`, created by the admin: the token, and its id."""
    created = http.post(f"/users/{user}/tokens", json={"description": f"limited {limits}", "limits": limits})
    assert created.status_code == 200, created.text
    return created.json()["token"], created.json()["metadata"]["token_id"]


def test_refused_requests_do_not_count_in_usage(secured, model_name):
    service, tokens = secured
    with HttpApi(service.http_url, headers=bearer(tokens["admin"])) as admin:
        token, token_id = admin_token(admin, {"requests_per_second": 0.1}, user=ADMIN)  # one request per 10 s
    with HttpApi(service.http_url, headers=bearer(token)) as http:
        assert http.post("/v1/embeddings", json=embed_body(model_name)).status_code == 200
        refused = [http.post("/v1/embeddings", json=embed_body(model_name)) for _ in range(3)]
        # Within the 10 s after the first; each would have counted before.
        assert [answer.status_code for answer in refused] == [429] * 3
        wait_until_usage_is_written(service, tokens, ADMIN, token_id)  # the listing is then read back from the store
        listed = http.get("/users/me/tokens")
    assert listed.status_code == 200
    (usage,) = [t["usage"] for t in listed.json() if t["description"] == "limited {'requests_per_second': 0.1}"]
    assert usage["requests"] == 1 and usage["texts"] == 3


def test_a_rate_limited_token_can_still_list_create_and_revoke_its_tokens(secured, model_name):
    service, tokens = secured
    with HttpApi(service.http_url, headers=bearer(tokens["admin"])) as admin:
        token, _ = admin_token(admin, {"requests_per_second": 0.1})
    with HttpApi(service.http_url, headers=bearer(token)) as http:
        assert http.post("/v1/embeddings", json=embed_body(model_name)).status_code == 200
        assert http.post("/v1/embeddings", json=embed_body(model_name)).status_code == 429
        # Within the 10 s the embedding limit asks it to wait: token management is not held to it.
        listed = http.get("/users/me/tokens")
        assert listed.status_code == 200, listed.text
        created = http.post("/users/me/tokens", json={"description": "made while limited"})
        assert created.status_code == 200, created.text
        assert http.delete(f"/users/me/tokens/{created.json()['metadata']['token_id']}").status_code == 204
        assert http.post("/v1/embeddings", json=embed_body(model_name)).status_code == 429


def triton_inferences(service, model_name: str) -> int:
    """Texts Triton's tokenizer step has been sent so far."""
    with HttpApi(service.triton_http_url) as triton:
        stats = triton.get(f"/v2/models/{model_name}-tokenizer/stats").json()
    return sum(model["inference_count"] for model in stats["model_stats"])


def test_tokens_per_minute_bound_a_burst_before_any_work_is_done(secured, model_name):
    service, tokens = secured
    with HttpApi(service.http_url, headers=bearer(tokens["admin"])) as admin:
        token, token_id = admin_token(admin, {"tokens_per_minute": 3000})
    # The probe's request: 2048 texts of about 125 tokens each, on a token allowed 3,000 tokens a minute.
    probe = {"model": model_name, "input": [f"{TEXTS[i % 3]} " * 12 for i in range(2048)]}
    # 10 texts of "hello" 248 times: 250 tokens each with [CLS] and [SEP], 2,500 in all.
    big = {"model": model_name, "input": ["hello " * 248] * 10}
    with HttpApi(service.http_url, headers=bearer(token)) as http:
        before = triton_inferences(service, model_name)
        started = time.monotonic()
        refused = http.post("/v1/embeddings", json=probe)
        print(f"\n2048-text request on a 3000 tokens/minute token: {refused.status_code} in {time.monotonic() - started:.3f} s")
        assert refused.status_code == 413, refused.text
        assert refused.json()["error"]["code"] == "payload_too_large" and "3000 prompt tokens a minute" in refused.text
        assert triton_inferences(service, model_name) == before  # refused before any text reached Triton
        # Not locked out: the refusal took nothing from the token's budget.
        small = http.post("/v1/embeddings", json=embed_body(model_name))
        assert small.status_code == 200, small.text
        served = http.post("/v1/embeddings", json=big)
        assert served.status_code == 200, served.text
        assert served.json()["usage"]["prompt_tokens"] == 2500
        again = http.post("/v1/embeddings", json=big)
        elapsed_s = time.monotonic() - started
        assert again.status_code == 429, again.text
        assert again.json()["error"]["code"] == "rate_limited"
        used = small.json()["usage"]["prompt_tokens"] + 2500
        # The 2,500 it needs minus what is left, refilled at 50 tokens a second.
        left = 3000 - used + 50 * elapsed_s
        assert (2500 - left) / 50 <= int(again.headers["retry-after"]) <= (2500 - (3000 - used)) / 50 + 1
        wait_until_usage_is_written(service, tokens, CLIENT, token_id)
        listed = http.get("/users/me/tokens")
    (usage,) = [t["usage"] for t in listed.json() if t["limits"]["tokens_per_minute"] == 3000]
    # Served within the minute's limit, and nothing for the refused requests.
    assert usage == {"requests": 2, "texts": 13, "prompt_tokens": used}


def test_tokens_per_minute_bound_a_grpc_burst_too(secured, model_name):
    service, tokens = secured
    with HttpApi(service.http_url, headers=bearer(tokens["admin"])) as admin:
        token, _ = admin_token(admin, {"tokens_per_minute": 3000})
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Embed(pb.EmbedRequest(model=model_name, inputs=[f"{TEXTS[0]} " * 12] * 2048), metadata=metadata, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3000 prompt tokens a minute" in refused.value.details()
        reply = stub.Embed(pb.EmbedRequest(model=model_name, inputs=TEXTS), metadata=metadata, timeout=30)
        assert len(reply.embeddings) == 3


def login(http: HttpApi, email: str, password: str, address: str):
    # The gateway trusts X-Forwarded-For from loopback (uvicorn's FORWARDED_ALLOW_IPS): each test is its own client.
    return http.post("/get_token", json={"email": email, "password": password}, headers={"X-Forwarded-For": address})


def test_guessing_one_accounts_password_is_throttled_with_429_and_retry_after(secured):
    service, _ = secured
    with HttpApi(service.http_url) as http:
        answers = [login(http, GUESSED, f"guess {i}", f"198.51.100.{i}") for i in range(8)]
        statuses = [answer.status_code for answer in answers]
        # Five free failures, the sixth starts the wait, and a check takes far less than the first second's wait.
        assert statuses[:6] == [401] * 6 and 429 in statuses[6:], statuses
        throttled = answers[statuses.index(429)]
        assert throttled.json()["code"] == "RATE_LIMITED" and int(throttled.headers["retry-after"]) >= 1
        # While it waits, even the right password is refused unchecked: guessing then learns nothing.
        right = login(http, GUESSED, GUESSED_PASSWORD, "198.51.100.200")
        assert right.status_code == 429
        time.sleep(int(right.headers["retry-after"]))  # the wait the gateway asked for
        assert login(http, GUESSED, GUESSED_PASSWORD, "198.51.100.200").status_code == 200


def test_one_address_guessing_across_accounts_is_throttled(secured):
    service, _ = secured
    with HttpApi(service.http_url) as http:
        statuses = [login(http, f"nobody{i}@example.com", "guess", "203.0.113.9").status_code for i in range(24)]
        assert statuses[:21] == [401] * 21 and 429 in statuses[21:], statuses
        # Another client logs in as ever.
        assert login(http, ADMIN, ADMIN_PASSWORD, "203.0.113.10").status_code == 200


def test_a_login_flood_checks_few_passwords_and_is_answered_429(secured):
    service, _ = secured
    flood_s, clients = 5.0, 4
    statuses: list[int] = []

    def flood(client: int) -> None:
        with HttpApi(service.http_url) as http:
            deadline = time.monotonic() + flood_s
            while time.monotonic() < deadline:
                statuses.append(login(http, FLOODED, f"wrong {client}", f"192.0.2.{client}").status_code)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(flood, range(clients)))
    checked = statuses.count(401)
    print(
        f"\nlogin flood: {len(statuses)} answers in {flood_s:.0f} s from {clients} clients: {checked} x 401, "
        f"{statuses.count(429)} x 429"
    )
    assert set(statuses) == {401, 429}
    # 5 free, then waits of 1 s, 2 s, 4 s: at most 8 passwords of one account checked in 5 s, however many ask
    # (fewer on a busy machine, where each check takes longer).
    assert checked <= 8

"""Requests cancelled by the server at the end of the shutdown grace period, in the fast tier: answered 503 with
Retry-After in their contract's shape, nothing logged as an error. The real gateway under SIGTERM with a stalled
Triton: tests/test_shutdown_e2e.py."""

from __future__ import annotations

import json
import logging

import pytest

from tests.http_harness import Gateway


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"input": "held"}),
        ("/semantic_embed", {"prompt": "held", "representation": "symmetric"}),
        ("/batch_semantic_embed", {"prompts": ["held", "too"], "representation": "document"}),
    ],
)
async def test_a_request_cancelled_by_the_server_is_answered_503_in_its_contract_shape(models, caplog, path, body):
    gateway = Gateway(models)
    gateway.triton.stall()
    body = json.dumps({"model": gateway.model.name, **body}).encode()
    connection = gateway.connect()
    connection.send(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await gateway.triton.called.wait()
    with caplog.at_level(logging.INFO):
        for task in gateway.server.server_state.tasks:  # as uvicorn does when the grace period ends
            task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        response = await connection.response()
    assert response.status == 503
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["content-type"] == "application/json"
    if path == "/v1/embeddings":
        error = response.json()["error"]
        assert (error["code"], error["type"]) == ("unavailable", "service_unavailable")
        message = error["message"]
    else:
        assert response.json()["code"] == "UNAVAILABLE"
        message = response.json()["error"]
    assert "shutting down" in message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert gateway.counted(path, 503) == 1
    assert gateway.scheduler.pending_texts == 0  # its queued work was dropped

"""Fast tier: how the gRPC port's descriptors are budgeted, and the retry delay a refused gRPC call carries."""

import json
import logging
import time

import grpc
import pytest

from gateway.core.errors import ErrorKind, ServiceError, invalid
from gateway.transports.grpc.connections import FDS_PER_GRPC_CONNECTION, split_descriptors
from gateway.transports.grpc.servicer import abort_with, trailing_metadata


def descriptors(budget) -> int:
    """What both ports can hold at once: HTTP a descriptor per connection, gRPC three per relayed one and its backlog."""
    return budget.http_connections + budget.grpc_connections * FDS_PER_GRPC_CONNECTION + budget.grpc_backlog


@pytest.mark.parametrize("total", [256, 512, 17696, 943718])
def test_the_derived_caps_share_the_budget_without_overlap(total):
    # 17696 is the budget at this machine's open-file limit of 20000, 943718 at Linux's default ceiling of 2^20.
    budget = split_descriptors(total)
    assert budget.grpc_connections >= 1 and budget.http_connections >= 1
    assert descriptors(budget) <= total
    # gRPC gets about a quarter, HTTP the rest: neither is left with a token share.
    grpc_part = budget.grpc_connections * FDS_PER_GRPC_CONNECTION + budget.grpc_backlog
    assert total // 4 - FDS_PER_GRPC_CONNECTION < grpc_part <= total // 4
    assert budget.http_connections >= total - total // 4


def test_caps_given_as_settings_are_kept_and_an_overcommitted_budget_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="gateway.transports.grpc.connections"):
        budget = split_descriptors(17696, grpc_connections=100)
        assert caplog.records == []
        assert budget.grpc_connections == 100
        assert budget.http_connections == 17696 - 100 * FDS_PER_GRPC_CONNECTION - budget.grpc_backlog

        budget = split_descriptors(17696, http_connections=17000, grpc_connections=2000)
        assert (budget.http_connections, budget.grpc_connections) == (17000, 2000)
        assert len(caplog.records) == 1 and "starve" in caplog.records[0].getMessage()


def test_a_retry_delay_travels_in_seconds_and_as_grpc_pushback():
    overloaded = ServiceError(ErrorKind.OVERLOADED, "busy", retry_after_s=3)
    assert trailing_metadata(overloaded) == (("retry-after", "3"), ("grpc-retry-pushback-ms", "3000"))
    # Kinds with a default delay carry it too, as HTTP's Retry-After does; a refusal that retrying cannot help carries none.
    assert dict(trailing_metadata(ServiceError(ErrorKind.UNAVAILABLE, "down")))["retry-after"] == "2"
    assert trailing_metadata(ServiceError(ErrorKind.PAYLOAD_TOO_LARGE, "too big")) == ()
    assert trailing_metadata(invalid("bad", "dimensions")) == (("field", "dimensions"),)


async def test_grpc_client_retries_wait_for_the_pushback():
    """A client whose retryPolicy covers RESOURCE_EXHAUSTED retries after the server's delay, not its own 10 ms
    backoff: the delay is in the form gRPC itself reads."""
    attempts: list[float] = []

    async def refuse(request, context):
        attempts.append(time.monotonic())
        await abort_with(context, ServiceError(ErrorKind.OVERLOADED, "busy", retry_after_s=1))

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("test.Busy", {"Call": grpc.unary_unary_rpc_method_handler(refuse)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    policy = {
        "maxAttempts": 2,
        "initialBackoff": "0.01s",
        "maxBackoff": "0.01s",
        "backoffMultiplier": 1,
        "retryableStatusCodes": ["RESOURCE_EXHAUSTED"],
    }
    config = json.dumps({"methodConfig": [{"name": [{"service": "test.Busy"}], "retryPolicy": policy}]})
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.service_config", config)]) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.unary_unary("/test.Busy/Call")(b"", timeout=10)
    finally:
        await server.stop(0)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(raised.value.trailing_metadata())["retry-after"] == "1"
    assert len(attempts) == 2
    assert attempts[1] - attempts[0] >= 0.95

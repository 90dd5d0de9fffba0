"""The gRPC port under an adversarial probe, against the real gateway and Triton: a flood of idle connections,
overload, cancelled and expired streams, and enum values the contract does not know."""

from __future__ import annotations

import errno
import re
import resource
import selectors
import socket
import threading
import time
import uuid
from pathlib import Path

import grpc
import psutil
import pytest
import requests

from export.datasets import sts_sentences
from harness.servers import start_service
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

# The flooded gateway's open-file limit (soft and hard, so it cannot raise it), and more idle connections than
# that: without a cap on the gRPC port they alone would take every descriptor the gateway has.
FD_LIMIT = 1024
IDLE_CONNECTIONS = 1200
HANDSHAKE_TIMEOUT_S = 2.0
MARGIN_S = 3.0  # how late past the timeout a connection may still be closed on a busy shared 2-core machine
# The flood's bounds: new connections a second, and at most a fiftieth of that at once. A burst of more connections
# than the gRPC cap (32 at this limit) within a real client's first round trip would push that client out too.
OPENS_PER_S = 500


class IdleFlood:
    """`count` connections to a port that never send a byte, opened at OPENS_PER_S. While reopening, each one the
    server closes is opened again, as an attacker would; then the rest are left to the server's clock."""

    def __init__(self, port: int, count: int):
        self.port = port
        self.count = count
        self.selector = selectors.DefaultSelector()
        self.reopening = threading.Event()
        self.reopening.set()
        self.all_opened = threading.Event()
        self.opened = 0
        self.closed_by_server = 0
        self.lifetimes: list[float] = []  # of the connections the server closed, from opening to closing
        self.thread = threading.Thread(target=self._run, daemon=True)
        self._abandon = threading.Event()

    def __enter__(self) -> IdleFlood:
        self.thread.start()
        assert self.all_opened.wait(30), "the flood could not open its connections"
        return self

    def __exit__(self, *exc_info) -> None:
        self.reopening.clear()
        self._abandon.set()
        self.thread.join(10)

    def _open(self) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        error = sock.connect_ex(("127.0.0.1", self.port))
        assert error in (0, errno.EINPROGRESS), errno.errorcode.get(error, error)
        self.selector.register(sock, selectors.EVENT_READ, time.monotonic())
        self.opened += 1
        if self.opened == self.count:
            self.all_opened.set()

    def _run(self) -> None:
        budget, last = 0.0, time.monotonic()
        while (self.selector.get_map() or self.reopening.is_set()) and not self._abandon.is_set():
            for key, _ in self.selector.select(timeout=0.02):
                sock = key.fileobj
                try:
                    if sock.recv(4096):  # a bare grpc server sends its SETTINGS at once: read, and stay idle
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self.selector.unregister(sock)
                sock.close()
                self.closed_by_server += 1
                self.lifetimes.append(time.monotonic() - key.data)
            now = time.monotonic()
            budget, last = min(budget + (now - last) * OPENS_PER_S, OPENS_PER_S / 50), now
            while self.reopening.is_set() and budget >= 1 and len(self.selector.get_map()) < self.count:
                self._open()
                budget -= 1
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()

    def wait_all_closed(self, timeout_s: float) -> bool:
        """Stops reopening; whether the server closed every connection left within timeout_s."""
        self.reopening.clear()
        self.thread.join(timeout_s)
        return not self.thread.is_alive()


def lowered_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@pytest.fixture
def enough_descriptors():
    """The flood's own sockets, in this process, beyond what it holds already."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = IDLE_CONNECTIONS + 256
    if soft < needed:
        assert hard == resource.RLIM_INFINITY or hard >= needed, (
            f"the test needs an open-file limit of {needed}, the hard one is {hard}"
        )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def announced_grpc_cap(log: Path) -> int:
    """The gRPC connection cap the gateway printed at start."""
    return int(re.search(r"connections at most: HTTP \d+, gRPC (\d+)", log.read_text()).group(1))


def connections_on(process: psutil.Process, port: int) -> int:
    return sum(c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED for c in process.net_connections("tcp"))


def own_channel(target: str) -> grpc.Channel:
    """A channel with a connection of its own: by default channels to one target share their connections."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def embed_over_grpc(channel: grpc.Channel, model: str, text: str) -> int:
    reply = pb_grpc.EmbeddingServiceStub(channel).Embed(pb.EmbedRequest(model=model, inputs=[text]), timeout=20)
    return len(reply.embeddings[0].values)


def test_idle_connections_to_the_grpc_port_leave_both_ports_serving(tmp_path, model_name, enough_descriptors):
    service = start_service(
        tmp_path / "service", extra_args=[f"--grpc-handshake-timeout-s={HANDSHAKE_TIMEOUT_S:g}"], preexec_fn=lowered_fd_limit
    )
    try:
        gateway = psutil.Process(service.process.pid)
        grpc_target = f"127.0.0.1:{service.grpc_port}"
        texts = sts_sentences()[:10]
        grpc_cap = None
        with own_channel(grpc_target) as kept:
            dimensions = embed_over_grpc(kept, model_name, texts[0])  # a channel connected before the flood
            with IdleFlood(service.grpc_port, IDLE_CONNECTIONS) as flood:
                for text in texts:
                    # A fresh HTTP connection, a fresh gRPC channel and the channel from before are all served.
                    body = {"model": model_name, "input": text}
                    response = requests.post(f"{service.http_url}/v1/embeddings", json=body, timeout=20)
                    assert response.status_code == 200, response.text
                    with own_channel(grpc_target) as fresh:
                        assert embed_over_grpc(fresh, model_name, text) == dimensions
                    assert embed_over_grpc(kept, model_name, text) == dimensions
                    assert gateway.num_fds() < FD_LIMIT
                    grpc_cap = grpc_cap or announced_grpc_cap(service.run_dir / "gateway.log")
                    assert connections_on(gateway, service.grpc_port) <= grpc_cap
                # What is left of it is closed by the handshake clock, none later than its timeout (and the margin).
                assert flood.wait_all_closed(HANDSHAKE_TIMEOUT_S + MARGIN_S), "idle connections outlived the handshake timeout"
                assert max(flood.lifetimes) <= HANDSHAKE_TIMEOUT_S + MARGIN_S
                longest = max(flood.lifetimes)
                print(
                    f"\n{flood.closed_by_server} idle connections closed by the gateway (gRPC cap {grpc_cap}), "
                    f"the longest open {longest:.2f} s"
                )
            assert embed_over_grpc(kept, model_name, "after the flood") == dimensions
    finally:
        service.stop()


def access_status(log: Path, offset: int, request_id: str, timeout_s: float = 20) -> str:
    """The status on the access line of request_id, once the gateway has written it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with log.open("rb") as f:
            f.seek(offset)
            for line in f.read().decode(errors="replace").splitlines():
                if f"[{request_id}]" in line and "gateway.access" in line:
                    return re.search(r"status=(\w+)", line).group(1)
        time.sleep(0.05)
    raise AssertionError(f"no access line for {request_id} within {timeout_s} s")


async def ended_streams_log(service, model_name: str, timeout_s: float, end) -> tuple[str, str]:
    """Opens an EmbedStream of 3000 texts (some 10 s of work here) with a deadline timeout_s away, reads one reply
    and no more, lets `end(call)` end the call; its access-log status, and what the gateway logged meanwhile (up to
    the access line of a later call, so that anything logged on the way out, by a finalizer say, is in it)."""
    log = service.run_dir / "gateway.log"
    offset = log.stat().st_size
    request_id = f"stream-{uuid.uuid4().hex}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)

        async def texts():
            for i, text in enumerate((sts_sentences() * 3)[:3000]):
                yield pb.EmbedStreamRequest(id=str(i), text=text, model=model_name)

        call = stub.EmbedStream(texts(), metadata=(("x-request-id", request_id),), timeout=timeout_s)
        assert (await call.read()).embedding.values  # in flight, most of its replies still to come
        await end(call)
        status = access_status(log, offset, request_id)
        later = f"after-{uuid.uuid4().hex}"
        await stub.ListModels(pb.ListModelsRequest(), metadata=(("x-request-id", later),))
        access_status(log, offset, later)
    with log.open("rb") as f:
        f.seek(offset)
        return status, f.read().decode(errors="replace")


@pytest.mark.parametrize(
    "how, timeout_s, expected",
    [("cancelled", 60, "CANCELLED"), ("past its deadline", 3, "DEADLINE_EXCEEDED")],
)
async def test_an_ended_stream_is_logged_as_what_ended_it_without_a_traceback(service, model_name, how, timeout_s, expected):
    async def end(call):
        if how == "cancelled":
            call.cancel()
        else:
            assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    status, logged = await ended_streams_log(service, model_name, timeout_s, end)
    assert status == expected
    assert "Traceback" not in logged and "ExecuteBatchError" not in logged, logged[-3000:]


def test_an_unknown_encoding_is_invalid_argument_naming_the_field(service, model_name):
    prompt = pb.Prompt(items=[pb.PromptItem(text="A man is playing guitar.")])
    requests_ = {
        "Embed": pb.EmbedRequest(model=model_name, inputs=["A man is playing guitar."], encoding=99),
        "SemanticEmbed": pb.SemanticEmbedRequest(model=model_name, prompt=prompt, encoding=99),
        "BatchSemanticEmbed": pb.BatchSemanticEmbedRequest(model=model_name, prompts=[prompt], encoding=99),
        "EmbedLayers": pb.EmbedLayersRequest(
            model=model_name, prompt=prompt, layers=[-1], poolings=[pb.POOLING_MEAN], encoding=99
        ),
    }
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for method, request in requests_.items():
            with pytest.raises(grpc.RpcError) as raised:
                getattr(stub, method)(request, timeout=20)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "'encoding'" in raised.value.details() and "99" in raised.value.details(), raised.value.details()
            assert dict(raised.value.trailing_metadata())["field"] == "encoding"

        items = [
            pb.EmbedStreamRequest(id="good", text="first", model=model_name),
            pb.EmbedStreamRequest(id="bad", text="second", model=model_name, encoding=99),
            pb.EmbedStreamRequest(id="packed", text="third", model=model_name, encoding=pb.VECTOR_ENCODING_PACKED_FLOAT32),
        ]
        replies = {reply.id: reply for reply in stub.EmbedStream(iter(items), timeout=20)}
    assert replies["bad"].error.code == "validation" and replies["bad"].error.field == "encoding"
    assert not replies["bad"].HasField("embedding")
    assert replies["good"].embedding.values and replies["packed"].embedding.values_float32_le

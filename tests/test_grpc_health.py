"""gRPC health Check answers from readiness as it is now, not from the last poll (fast tier: no server).

The service and policy below are stand-ins that only say whether the gateway is ready; the servicer under test is
the real one, and nothing polls it here, so only Check itself can bring its answer up to date.
"""

from types import SimpleNamespace

from grpc_health.v1 import health_pb2

from gateway.transports.grpc.server import SERVICE_NAME, ReadinessHealth


class Readiness:
    """The policy's readiness verdict, switched by the test."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def unready_reason(self, health) -> str | None:
        return self.reason


async def test_check_follows_readiness_without_waiting_for_a_poll():
    readiness = Readiness()
    servicer = ReadinessHealth(SimpleNamespace(health=object()), readiness)
    await servicer.report()
    for name in ("", SERVICE_NAME):
        request = health_pb2.HealthCheckRequest(service=name)
        assert (await servicer.Check(request, None)).status == health_pb2.HealthCheckResponse.SERVING
        readiness.reason = "the token store is unavailable"
        assert (await servicer.Check(request, None)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        readiness.reason = None
        assert (await servicer.Check(request, None)).status == health_pb2.HealthCheckResponse.SERVING

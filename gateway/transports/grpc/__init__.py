"""The gRPC transport: the connection gate on the public port, the grpc.aio server behind it, and the servicer."""

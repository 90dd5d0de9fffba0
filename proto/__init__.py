"""The gRPC contract (embedding/v1/embedding.proto) and the command that generates its Python stubs."""

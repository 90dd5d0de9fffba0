"""The ways in: HTTP (Aleph Alpha, OpenAI and token routes) and gRPC, each turning its calls into the core's, and
the admission policy both apply first."""

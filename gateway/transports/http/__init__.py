"""The HTTP transport: a uvicorn server with connection limits, the Starlette app, and one module per contract."""

"""Who may call: users and API tokens (store), their checks (authenticator), per-token rate and budget limits, and
the `python -m gateway users|tokens` commands (cli)."""

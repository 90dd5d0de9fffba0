"""Operations: settings, logs, metrics and the per-request context they read. The bottom layer: it imports no other
part of the gateway."""

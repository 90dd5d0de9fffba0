"""A request's deadline: one monotonic instant that every step of its life is measured against."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Deadline:
    expires_at: float

    @classmethod
    def within(cls, default_s: float, requested_s: float | None = None) -> Deadline:
        """The sooner of the server's default and what the caller asked for (a gRPC deadline, an HTTP header)."""
        seconds = default_s if requested_s is None else min(default_s, max(requested_s, 0.0))
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return max(self.expires_at - time.monotonic(), 0.0)

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0

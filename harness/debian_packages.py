"""Debian packages that end-to-end tests start servers from. `bin/setup --checks` (which bin/test runs) installs
them; a test never does, and says what is missing instead."""

from __future__ import annotations

import os


def installed(package: str, binary: str) -> str:
    """The path of `binary`, which Debian's `package` provides; a clear error when it is missing."""
    if os.access(binary, os.X_OK):
        return binary
    raise RuntimeError(f"{binary} is missing: run `bin/setup --checks`, which installs Debian's {package!r} (as root)")

"""Resident memory of a process and everything it started (Triton and its Python-backend stubs), from /proc."""

from __future__ import annotations

import os
import threading
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    result = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            result += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return result


def rss_mib(pid: int, with_descendants: bool) -> float:
    """RSS of pid, summed over its descendants when asked. Pages shared between them (libraries, Triton's
    shared-memory pool mapped by every stub) count once per process: an upper bound on what the tree holds."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
        if with_descendants:
            pending += _children(current)
    return total / 2**20


class PeakSampler:
    """Samples rss_mib of each named (pid, with_descendants) in a background thread; .peaks holds the largest seen."""

    def __init__(self, pids: dict[str, tuple[int, bool]], interval_s: float = 0.25):
        self.pids = pids
        self.interval_s = interval_s
        self.peaks = {name: 0.0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for name, pid in self.pids.items():
                self.peaks[name] = max(self.peaks[name], rss_mib(*pid))

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

"""Memory and CPU time of a process and everything it started (Triton and its Python-backend stubs), from /proc."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from export.repository import STEP_ROLES

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
INSTANCE_NAME = re.compile(r"^([\w.-]+)_\d+_\d+$")


def _children(pid: int) -> list[int]:
    result = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            result += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return result


def _descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending += _children(current)
    return found


def _label(pid: int, root: int) -> str:
    """gateway for the root, the step (tokenizer, encoder, ...) for a Python-backend stub, else the program name."""
    if pid == root:
        return "gateway"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    # A stub's arguments include its instance name, <model>_<group>_<index>.
    instance = next((a for a in argv[1:] if INSTANCE_NAME.match(a)), None) if argv[0].endswith("_stub") else None
    if not instance:
        return Path(argv[0]).name
    model = INSTANCE_NAME.match(instance).group(1)
    # Step models are named <served model>-<step>; every model's steps of one kind count together.
    return next((role for role in STEP_ROLES if model.endswith(f"-{role}")), model)


def cpu_seconds(root: int) -> dict[str, float]:
    """User+system CPU seconds per component of root's process tree; stubs of one model are summed."""
    totals: dict[str, float] = {}
    for pid in _descendants(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            label = _label(pid, root)
        except OSError:
            continue
        totals[label] = totals.get(label, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return totals


def machine_ticks() -> tuple[int, int, int]:
    """(idle, steal, total) ticks of all cores since boot, from /proc/stat. Steal is time the hypervisor gave
    this VM's cores to someone else: where it is high, a run measured a slower machine."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], fields[7], sum(fields[:8])


def rss_mib(pid: int, with_descendants: bool) -> float:
    """RSS of pid, summed over its descendants when asked. Pages shared between them (libraries, Triton's
    shared-memory pool mapped by every stub) count once per process: an upper bound on what the tree holds."""
    total = 0
    for current in _descendants(pid) if with_descendants else [pid]:
        try:
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
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

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per component between two cpu_seconds() reads; a component started in between counts from zero."""
    return {label: after[label] - before.get(label, 0.0) for label in after}

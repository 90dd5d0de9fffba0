"""What every bench command does around its measurement: a fresh work dir per run, and the command line it records."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from harness.servers import ROOT


def table_parser(module: str, doc: str, table: str) -> argparse.ArgumentParser:
    """The arguments of a command that writes one results table: --out (default bench/results/`table`) and --work-dir."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / table)
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".bench")
    return parser


def fresh_work_dir(base: Path, prefix: str) -> Path:
    """A new directory under `base` (made if missing) for one run's servers, logs and copies."""
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def command_line(program: str, argv: list[str] | None) -> str:
    """How this run was started, for the results it writes: `program` and its arguments (argv, else the process's)."""
    return " ".join([program, shlex.join(argv if argv is not None else sys.argv[1:])]).rstrip()

"""CLI: python -m proto.generate [--check]

Generates the Python stubs of every .proto under proto/ next to it, with the protoc bundled in grpcio-tools.
The .proto files are the single truth: the stubs are git-ignored and written by bin/setup. Only stubs whose
content changed are rewritten, so a re-run is cheap and leaves mtimes alone. --check writes nothing and
exits 1 when a stub is missing or differs from what the .proto produces.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent


def _compile(out_dir: Path) -> dict[Path, bytes]:
    """Every generated file, keyed by its path relative to the project root."""
    sources = [str(p.relative_to(ROOT)) for p in sorted(PROTO_DIR.rglob("*.proto"))]
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {sources}")
    return {path.relative_to(out_dir): path.read_bytes() for path in sorted(out_dir.rglob("*")) if path.is_file()}


def stale_stubs() -> list[Path]:
    """Generated files that are missing or differ from what the .proto files produce now."""
    with tempfile.TemporaryDirectory() as tmp:
        generated = _compile(Path(tmp))
    return [path for path, content in generated.items() if not (ROOT / path).is_file() or (ROOT / path).read_bytes() != content]


def generate() -> list[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        generated = _compile(Path(tmp))
    written = []
    for path, content in generated.items():
        target = ROOT / path
        if not target.is_file() or target.read_bytes() != content:
            target.write_bytes(content)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proto.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a stub is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        for path in stale:
            print(f"stale: {path} (run `python -m proto.generate`)", file=sys.stderr)
        return 1 if stale else 0
    written = generate()
    print(f"[proto] {'wrote ' + ', '.join(map(str, written)) if written else 'stubs are up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerates the gRPC stubs in ps/rpc/ from proto/embps/*.proto with grpc_tools.protoc.

    python -m ps.rpc.generate           # rewrite the stubs
    python -m ps.rpc.generate --check   # exit 1 (and name the files) if the stubs are stale

protoc writes `from embps import ps_pb2`, which would import the `embps` command line module;
the stubs are rewritten to import as `ps.rpc.ps_pb2`.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
PROTO_PACKAGE = "embps"
OUT_DIR = Path(__file__).resolve().parent
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def render(proto_root: Path = PROTO_ROOT) -> dict[str, str]:
    """Runs protoc into a scratch folder; returns {file name in ps/rpc: text} after the import fix-up."""
    from grpc_tools import protoc

    protos = sorted((proto_root / PROTO_PACKAGE).glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root / PROTO_PACKAGE}")
    include = Path(protoc.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            *(str(p.relative_to(proto_root)) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        generated = {}
        for path in sorted((Path(scratch) / PROTO_PACKAGE).iterdir()):
            if path.name.endswith(SUFFIXES):
                generated[path.name] = _fix_imports(path.read_text())
    return generated


def _fix_imports(text: str) -> str:
    return re.sub(rf"^from {PROTO_PACKAGE} import (\w+_pb2)", r"from ps.rpc import \1", text, flags=re.M)


def stale_files(proto_root: Path = PROTO_ROOT, out_dir: Path = OUT_DIR) -> list[str]:
    """Names of stubs in `out_dir` that differ from a fresh render (or are missing or left over)."""
    fresh = render(proto_root)
    on_disk = {p.name for p in out_dir.iterdir() if p.name.endswith(SUFFIXES)}
    stale = [
        name for name, text in fresh.items() if not (out_dir / name).exists() or (out_dir / name).read_text() != text
    ]
    stale += sorted(on_disk - fresh.keys())
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs, exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale gRPC stubs in {OUT_DIR}: {', '.join(stale)}; run `python -m ps.rpc.generate`")
            return 1
        print("gRPC stubs are up to date")
        return 0
    for name, text in render().items():
        (OUT_DIR / name).write_text(text)
        print(f"wrote {OUT_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

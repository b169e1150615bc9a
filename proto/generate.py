"""Generate the Python stubs of every .proto under proto/ into core/src/noiserater/core/.

The stubs are committed (so the server image and a plain `pip install ./core` need no grpcio-tools);
`tests/test_proto_stubs.py` regenerates them into a temporary folder and fails when they differ, so a
.proto edit without `make proto` cannot land.

protoc names Python modules after the .proto path (noiserater/v1/x.proto -> noiserater.v1.x_pb2); the
package lives at noiserater.core.v1, so imports are rewritten after generation.

Usage: python proto/generate.py [OUT_DIR]   (default: core/src/noiserater/core)
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "core" / "src" / "noiserater" / "core"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def python_package(proto_dir: str) -> str:
    """noiserater/v1 -> v1, inference -> inference (relative to noiserater.core)."""
    parts = proto_dir.split("/")
    if parts[0] == "noiserater":
        parts = parts[1:]
    return ".".join(parts)


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # build-time only dependency

    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", *files]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        proto_dirs = sorted({str(Path(f).parent) for f in files})
        for generated in sorted(Path(tmp).rglob("*.py")):
            rel_dir = str(generated.parent.relative_to(tmp))
            target_dir = out_dir / python_package(rel_dir).replace(".", "/")
            target_dir.mkdir(parents=True, exist_ok=True)
            text = generated.read_text()
            for proto_dir in proto_dirs:
                module = proto_dir.replace("/", ".")
                text = re.sub(
                    rf"^from {re.escape(module)} import",
                    f"from noiserater.core.{python_package(proto_dir)} import",
                    text,
                    flags=re.MULTILINE,
                )
            target = target_dir / generated.name
            target.write_text(text)
            written.append(target)
            init = target_dir / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated gRPC stubs (see proto/generate.py)."""\n')
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    if out == DEFAULT_OUT:
        for old in DEFAULT_OUT.rglob("*_pb2*.py"):
            old.unlink()
    for path in generate(out):
        print(path)

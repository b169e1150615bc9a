"""The committed gRPC stubs are exactly what proto/generate.py makes from the .proto files."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "core" / "src" / "noiserater" / "core"


def test_committed_stubs_match_the_protos(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), str(tmp_path)], check=True,
                   capture_output=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py"))
    committed = sorted(p.relative_to(COMMITTED) for p in COMMITTED.rglob("*_pb2*.py"))
    assert generated, "generate.py produced no stubs"
    assert generated == committed
    stale = [str(p) for p in generated if (tmp_path / p).read_text() != (COMMITTED / p).read_text()]
    assert not stale, f"stubs out of date, run `make proto`: {stale}"


def test_stubs_import_under_the_namespace():
    from noiserater.core.v1 import rater_service_pb2, rater_service_pb2_grpc

    names = set(rater_service_pb2.DESCRIPTOR.services_by_name["RaterService"].methods_by_name)
    assert {"SelectNoise", "Score", "ListModels", "GetModelMetadata", "DeployModel", "GetStats"} <= names
    assert hasattr(rater_service_pb2_grpc, "RaterServiceStub")

"""The committed gRPC stubs in ps/rpc/ match a fresh protoc run over proto/."""

import shutil

from ps.rpc import generate


def test_committed_stubs_are_fresh():
    stale = generate.stale_files()
    assert not stale, f"stale stubs {stale}: run `python -m ps.rpc.generate` and commit ps/rpc/"


def test_a_proto_change_is_detected(tmp_path):
    shutil.copytree(generate.PROTO_ROOT, tmp_path / "proto")
    proto = tmp_path / "proto" / "embps" / "ps.proto"
    proto.write_text(proto.read_text().replace("message StatsRequest {}", "message StatsRequest { bool verbose = 1; }"))
    assert "ps_pb2.py" in generate.stale_files(tmp_path / "proto")


def test_stubs_import_as_ps_rpc():
    text = (generate.OUT_DIR / "ps_pb2_grpc.py").read_text()
    assert "from ps.rpc import ps_pb2" in text and "from embps import" not in text

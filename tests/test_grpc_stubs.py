"""The committed .proto is the single truth: the generated stubs must be exactly what it produces now."""

from proto.generate import stale_stubs


def test_generated_stubs_match_the_proto():
    stale = stale_stubs()
    assert not stale, f"stale gRPC stubs {[str(p) for p in stale]}: run `python -m proto.generate` (bin/setup does)"

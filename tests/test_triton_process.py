"""Start-up checks of the Triton launcher that need no server."""

import pytest

from gateway.triton.process import TritonPorts, TritonProcess, TritonStartError
from harness.servers import ROOT


def test_a_run_directory_with_an_equals_sign_is_refused_before_triton_starts(tmp_path):
    run_dir = tmp_path / "variant=1"
    triton = TritonProcess(ROOT / "model_repository", [], TritonPorts(1, 2, 3), run_dir, run_dir / "triton.log")
    with pytest.raises(TritonStartError, match="must not contain '='"):
        triton.start(timeout_s=1)
    assert triton.process is None


@pytest.mark.parametrize("key", ["short", "sixteen:chars=ab,cd", "with a space in it!"])
def test_an_admin_key_that_triton_cannot_take_is_refused_before_triton_starts(tmp_path, key):
    triton = TritonProcess(ROOT / "model_repository", [], TritonPorts(1, 2, 3), tmp_path, tmp_path / "triton.log", admin_key=key)
    with pytest.raises(TritonStartError, match="admin key must be at least 16 characters"):
        triton.start(timeout_s=1)
    assert triton.process is None
    assert not triton.admin_key_file.exists()

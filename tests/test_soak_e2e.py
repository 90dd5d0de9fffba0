"""The short soak: 2 minutes of mixed load, memory flat after the warm-up, nothing failed (bench.soak is the 30-minute run)."""

import pytest

from bench.soak import soak

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def test_two_minutes_of_mixed_load_keep_memory_flat():
    _samples, summary = await soak(minutes=2, sample_every_s=15, warmup_s=45)
    print(f"[soak] {summary}")
    assert summary["requests"] > 1000
    assert summary["failed"] == {}
    assert summary["gateway_growth"] < 0.05
    assert summary["triton_growth"] < 0.05

"""Reading a running gateway's /metrics, as Prometheus would, for tests and benchmarks that wait on its state."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


async def metric_sum(
    session: aiohttp.ClientSession, url: str, name: str, where: Callable[[dict[str, str]], bool] = lambda labels: True
) -> float:
    """The sum of the samples called `name` whose labels `where` accepts (the gauge or counter read from memory)."""
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and where(sample.labels)
    )

"""Reading a running gateway's /metrics, as Prometheus would, for tests and benchmarks that wait on its state."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import aiohttp
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

Labels = Callable[[dict[str, str]], bool]


def sample_sum(families: Iterable[Metric], name: str, where: Labels = lambda labels: True) -> float:
    """The sum of the samples called `name` whose labels `where` accepts."""
    return sum(sample.value for family in families for sample in family.samples if sample.name == name and where(sample.labels))


async def metric_sum(session: aiohttp.ClientSession, url: str, name: str, where: Labels = lambda labels: True) -> float:
    """sample_sum over a gateway's /metrics (the gauge or counter read from memory)."""
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    return sample_sum(text_string_to_metric_families(text), name, where)

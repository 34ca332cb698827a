"""TorchServe's metrics endpoint, read through serving.client.TorchServeClient.metrics and parsed
with Prometheus's own client library."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def parse(text: str) -> list[Sample]:
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of a counter's samples whose labels include `labels` (over versions, workers, hosts).
    `name_total` counts too: the parser names counter samples so."""
    names = {name, f"{name}_total"}
    return sum(s.value for s in samples if s.name in names and all(s.labels.get(k) == v for k, v in labels.items()))


def scrape(client, names: list[str]) -> list[Sample]:
    """The samples of the metric families `names` (TorchServe filters by `name[]`)."""
    return parse(client.metrics(names))

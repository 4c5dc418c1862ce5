"""Prometheus metrics: the Go server's names, plus latency, upstream and byte counts.

The exposition resource (prometheus-client's Twisted resource) renders in a
worker thread, so nothing here touches the index from that thread: the cache
sizes are refreshed on the reactor thread and only read at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource

from ociregistry.index import Index

# Upstreams that clients name but the configuration does not are counted together, so that
# client-chosen names cannot grow the exposition (and the server's memory) without bound.
OTHER_REGISTRY = "other"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _Snapshot(Collector):
    """Values refreshed on the reactor thread, reported at scrape time."""

    def __init__(self) -> None:
        self.manifests = 0
        self.blobs = 0
        self.bytes_on_disk = 0
        self.upstream_pulls: dict[str, int] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("ociregistry_cached_manifest_count", "Manifests in the cache.", self.manifests)
        yield GaugeMetricFamily("ociregistry_cached_blob_count", "Blobs in the cache.", self.blobs)
        yield GaugeMetricFamily("ociregistry_blob_bytes_on_disk_total", "Bytes of manifests and blobs on disk.",
                                self.bytes_on_disk)
        # The Go server's name has no _total suffix, which a prometheus-client Counter would add.
        pulls = GaugeMetricFamily("ociregistry_upstream_pulls_by_ns", "Pulls that went upstream, by namespace.",
                                  labels=["ns"])
        for ns, count in sorted(self.upstream_pulls.items()):
            pulls.add_metric([ns], count)
        yield pulls


class _ByRegistry:
    """A labelled metric whose first label, a registry, is one of a bounded set of names."""

    def __init__(self, metric: Counter | Histogram, label: Callable[[str], str]) -> None:
        self._metric = metric
        self._label = label

    def labels(self, registry: str, *others: str) -> Any:
        """The child for a registry (as its bounded label) and the other label values."""
        return self._metric.labels(self._label(registry), *others)


class Metrics:
    """Every metric the server exposes, in a registry of its own.

    ``registries`` are the upstreams counted by name (the configured ones and
    the default namespace); every other upstream is counted as ``other``.
    """

    def __init__(self, registries: Iterable[str] = ()) -> None:
        self._named = frozenset(registries)
        self.registry = CollectorRegistry()
        r = self.registry
        self.cached_pulls = self._by_registry(Counter("ociregistry_cached_pulls_by_ns", "Pulls served from the cache, by namespace.",
                                    ["ns"], registry=r))
        self.manifest_pulls = Counter("ociregistry_manifest_pulls", "Manifest requests answered.", registry=r)
        self.blob_pulls = Counter("ociregistry_blob_pulls", "Blob requests answered.", registry=r)
        self.api_errors = Counter("ociregistry_api_errors", "Requests answered with an error status.", registry=r)
        self.requests = Histogram("ociregistry_request_seconds", "Time to answer a request (headers sent).",
                                  ["route", "status"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_requests = self._by_registry(Histogram(
            "ociregistry_upstream_request_seconds", "Upstream requests by registry and outcome, with their latency.",
            ["registry", "outcome"], buckets=_LATENCY_BUCKETS, registry=r))
        self.bytes_served = Counter("ociregistry_bytes_served", "Blob bytes sent to clients, by source.",
                                    ["source"], registry=r)
        self.bytes_fetched = self._by_registry(Counter(
            "ociregistry_bytes_fetched", "Blob bytes fetched from upstreams.", ["registry"], registry=r))
        self.downloads = Gauge("ociregistry_downloads_in_flight", "Blob downloads in progress.", registry=r)
        self.waiters = Gauge("ociregistry_coalesced_waiters",
                             "Responses streaming a blob that is still downloading.", registry=r)
        self._snapshot = _Snapshot()
        r.register(self._snapshot)

    def registry_label(self, name: str) -> str:
        """The label a registry is counted under: its name if configured, else ``other``."""
        return name if name in self._named else OTHER_REGISTRY

    def _by_registry(self, metric: Counter | Histogram) -> _ByRegistry:
        return _ByRegistry(metric, self.registry_label)

    def upstream_pull(self, ns: str) -> None:
        """Count a pull that went upstream."""
        label = self.registry_label(ns)
        self._snapshot.upstream_pulls[label] = self._snapshot.upstream_pulls.get(label, 0) + 1

    async def refresh(self, index: Index) -> None:
        """Read the cache's size from the index (answered on the reactor thread)."""
        self._snapshot.manifests, self._snapshot.blobs, self._snapshot.bytes_on_disk = await index.totals()

    def track_downloads(self, count: Callable[[], int]) -> None:
        """Report the number of downloads in progress at scrape time."""
        self.downloads.set_function(count)

    def resource(self) -> Resource:
        """The /metrics resource."""
        return cast(Resource, MetricsResource(self.registry))

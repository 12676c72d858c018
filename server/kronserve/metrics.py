"""Prometheus metrics, held by one object passed to each stage (no module-level collectors).

Per-task labels have bounded cardinality: the first `max_tasks` distinct task ids seen by this
process get their own `task` label; every later task is counted under `task="__other__"`. So a
server with thousands of tasks exports at most max_tasks + 1 task series per metric.
"""

from __future__ import annotations

import platform
import threading
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from . import __version__

OTHER_TASK = "__other__"
_LOAD = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5)
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_STEP_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Label values known in advance: their series exist at 0 from the start (see Metrics._zeroed).
TIERS = ("device", "host")
CANCEL_STAGES = ("queued", "running")
LOAD_SOURCES = ("store", "upload")
LOAD_FAILURE_CODES = (
    "invalid_adapter",
    "unsupported_format",
    "invalid_spec",
    "backbone_mismatch",
    "bank_full",
    "pin_refused",
    "store_error",
    "store_conflict",
)


def _version_of(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


class Metrics:
    def __init__(self, max_tasks: int = 100) -> None:
        # `*_created` series double the series count and no dashboard reads them (prometheus_client's one switch).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, open fds...
        PlatformCollector(registry=r)  # python_info
        Info("kronserve_build", "Versions this server runs", registry=r).info(
            {
                "version": __version__,
                "python": platform.python_version(),
                "torch": _version_of("torch"),
                "transformers": _version_of("transformers"),
            }
        )
        self.requests = Counter(
            "kronserve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.failures = Counter(
            "kronserve_request_failures", "Failed requests by endpoint and error code", ["endpoint", "code"], registry=r
        )
        self.task_requests = Counter(
            "kronserve_task_requests",
            "Predict/score requests by task (bounded, see docs)",
            ["task", "endpoint"],
            registry=r,
        )
        self.latency = Histogram(
            "kronserve_request_latency_seconds", "End-to-end latency", ["endpoint"], buckets=_LATENCY, registry=r
        )
        self.queue_wait = Histogram(
            "kronserve_queue_wait_seconds",
            "Time from acceptance to admission into the engine",
            buckets=_LATENCY,
            registry=r,
        )
        self.engine_time = Histogram(
            "kronserve_engine_seconds",
            "Engine time per admission (encoder + first step) or score pass",
            ["kind"],
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_rows = Histogram(
            "kronserve_batch_rows", "Rows per admission or score pass", buckets=_ROWS, registry=r
        )
        self.batch_tasks = Histogram(
            "kronserve_batch_tasks", "Distinct tasks per admission or score pass", buckets=_ROWS, registry=r
        )
        self.step_seconds = Histogram(
            "kronserve_step_seconds", "Time of one decode step over every running row", buckets=_LATENCY, registry=r
        )
        self.step_rows = Histogram(
            "kronserve_step_rows", "Running decoder rows per decode step", buckets=_STEP_ROWS, registry=r
        )
        self.step_tasks = Histogram(
            "kronserve_step_tasks", "Distinct tasks per decode step", buckets=_STEP_ROWS, registry=r
        )
        self.step_admissions = Histogram(
            "kronserve_step_admissions",
            "Requests admitted into the running batch per decode step",
            buckets=_ROWS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "kronserve_time_to_first_token_seconds",
            "From admission to a request's first token",
            buckets=_LATENCY,
            registry=r,
        )
        self.inter_token = Histogram(
            "kronserve_inter_token_seconds", "Time between a running request's tokens", buckets=_LATENCY, registry=r
        )
        self.cancelled = Counter(
            "kronserve_cancelled_requests",
            "Requests dropped by the engine because their caller gave up",
            ["stage"],
            registry=r,
        )
        self.queue_depth = Gauge("kronserve_queue_depth", "Requests waiting for a batch", registry=r)
        self.queue_capacity = Gauge(
            "kronserve_queue_capacity", "Queued requests beyond which new ones get 503 (queue_size)", registry=r
        )
        self.engine_restarts = Counter(
            "kronserve_engine_restarts", "Times the engine process died and was started again", registry=r
        )
        self.generated_tokens = Counter(
            "kronserve_generated_tokens",
            "Tokens generated for predict outputs (EOS included; beams: the answer's)",
            registry=r,
        )
        self.input_tokens = Counter(
            "kronserve_input_tokens", "Input tokens of admitted predict and score requests", registry=r
        )
        self.adapters_active = Gauge("kronserve_adapters_active", "Tasks with an active version", registry=r)
        self.adapters_unavailable = Gauge(
            "kronserve_adapters_unavailable",
            "Tasks in the store whose active version could not be loaded (they answer 503; see /readyz)",
            registry=r,
        )
        self.adapters_resident = Gauge(
            "kronserve_adapters_resident",
            "Adapter versions held in memory, host or device tier (active + draining)",
            registry=r,
        )
        self.tier_adapters = Gauge(
            "kronserve_tier_adapters", "Adapter versions resident in each tier", ["tier"], registry=r
        )
        self.tier_bytes = Gauge(
            "kronserve_tier_bytes", "Bytes of the adapter versions resident in each tier", ["tier"], registry=r
        )
        self.tier_budget_bytes = Gauge(
            "kronserve_tier_budget_bytes",
            "Each tier's budget (host_adapter_mb, device_adapter_mb)",
            ["tier"],
            registry=r,
        )
        self.tier_hits = Counter(
            "kronserve_tier_hits", "Requests whose adapter was already in the tier", ["tier"], registry=r
        )
        self.tier_misses = Counter(
            "kronserve_tier_misses",
            "Adapter loads into a tier (host: read + validate; device: copy)",
            ["tier"],
            registry=r,
        )
        self.tier_evictions = Counter(
            "kronserve_tier_evictions", "Least recently used adapter versions evicted from a tier", ["tier"], registry=r
        )
        self.tier_load_seconds = Histogram(
            "kronserve_tier_load_seconds", "Time to load one adapter into a tier", ["tier"], buckets=_LOAD, registry=r
        )
        self.adapter_loads = Counter("kronserve_adapter_loads", "Adapter versions loaded", ["source"], registry=r)
        self.adapter_load_failures = Counter(
            "kronserve_adapter_load_failures", "Adapter loads refused or failed", ["source", "code"], registry=r
        )
        self.adapter_load_seconds = Histogram(
            "kronserve_adapter_load_seconds", "Validate + store + load time", buckets=_LATENCY, registry=r
        )
        self._max_tasks = max_tasks
        self._labelled: set[str] = set()
        self._lock = threading.Lock()
        self._zeroed()

    def _zeroed(self) -> None:
        """Every series whose label values are known exists from the start, at 0: a dashboard or an alert on a
        failure counter shows 0 until the first failure, not "no data"."""
        for tier in TIERS:
            for family in (self.tier_hits, self.tier_misses, self.tier_evictions, self.tier_load_seconds):
                family.labels(tier)
            for gauge in (self.tier_adapters, self.tier_bytes, self.tier_budget_bytes):
                gauge.labels(tier)
        for stage in CANCEL_STAGES:
            self.cancelled.labels(stage)
        for source in LOAD_SOURCES:
            self.adapter_loads.labels(source)
            for code in LOAD_FAILURE_CODES:
                self.adapter_load_failures.labels(source, code)

    def task_label(self, task: str) -> str:
        with self._lock:
            if task in self._labelled:
                return task
            if len(self._labelled) < self._max_tasks:
                self._labelled.add(task)
                return task
        return OTHER_TASK

    def render(self) -> bytes:
        return generate_latest(self.registry)


def merged_sum(texts: list[bytes]) -> bytes:
    """Prometheus texts of processes that share one job (the API process and the engine process) as one: each
    counter, histogram and summary sample is summed over them; a gauge takes the largest value (each gauge is
    set by one process; the other keeps its zero), an info the first."""
    families: dict[str, Any] = {}
    values: dict[tuple[str, tuple], float] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(family.name, family)
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in values:
                    values[key] = sample.value
                    if merged is not family:
                        merged.samples.append(sample)
                elif family.type in ("counter", "histogram", "summary"):
                    values[key] += sample.value
                elif family.type == "gauge":
                    values[key] = max(values[key], sample.value)
    for family in families.values():
        family.samples = [s._replace(value=values[(s.name, tuple(sorted(s.labels.items())))]) for s in family.samples]
    return generate_latest(_Families(list(families.values())))


def merged_with_source(texts: dict[str, bytes]) -> bytes:
    """Prometheus texts of several registries (the cluster gateway's and each replica's) as one, every sample
    labelled `replica="<source>"`: the same metric names stay one family, told apart by the label."""
    families: dict[str, Any] = {}
    for source, text in texts.items():
        for family in text_string_to_metric_families(text.decode()):
            samples = [s._replace(labels={**s.labels, "replica": source}) for s in family.samples]
            merged = families.setdefault(family.name, family)
            if merged is family:
                family.samples = samples
            else:
                merged.samples.extend(samples)
    return generate_latest(_Families(list(families.values())))


class _Families(CollectorRegistry):
    """Parsed families, rendered again by prometheus_client's own exposition code."""

    def __init__(self, families: list[Any]) -> None:
        super().__init__()
        self._families = families

    def collect(self) -> Any:
        yield from self._families

"""The observability kit queries only metrics a real server exports, and /metrics carries what operators expect."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kronserve import __version__

from ..test_packaging import queried_metrics
from .conftest import Server

# Sample names a family can be queried by, per type (the parser strips counters' `_total` and info's `_info`).
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum"),
    "info": ("_info",),
    "gauge": ("",),
    "untyped": ("",),
}


@pytest.mark.parametrize("server", ["single"], indirect=True)
def test_every_metric_the_dashboard_and_alerts_query_is_exported(server: Server) -> None:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    exported = {f.name + suffix for f in text_string_to_metric_families(text) for suffix in SUFFIXES.get(f.type, ("",))}
    missing = queried_metrics() - exported
    assert not missing, f"the kit queries metrics /metrics does not have: {sorted(missing)}"


@pytest.mark.parametrize("server", ["single"], indirect=True)
def test_metrics_carry_process_build_and_token_series_but_no_created(server: Server) -> None:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    assert families["process_resident_memory_bytes"].samples[0].value > 10e6  # a loaded T5 process: > 10 MB
    (build,) = families["kronserve_build_info"].samples
    assert build.labels["version"] == __version__ and build.value == 1
    assert families["kronserve_queue_capacity"].samples[0].value == 256  # the default queue_size
    assert families["kronserve_generated_tokens"].type == "counter"
    assert not any(s.name.endswith("_created") for f in families.values() for s in f.samples)

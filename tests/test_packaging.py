"""What ships: the licence, the declared dependencies, the image's layer order, compose and the observability kit."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_license_file_matches_pyproject() -> None:
    assert PYPROJECT["license"] == "Apache-2.0" and PYPROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in text


def imported_modules(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("kronserve", "kronserve_client")}


def test_every_imported_library_is_declared() -> None:
    """A library the code imports must be a dependency (or an extra's) of its own, not one that happens to come along
    with another (tqdm came with transformers)."""
    declared = {Requirement(r).name.lower().replace("_", "-") for r in PYPROJECT["dependencies"]}
    for extra in PYPROJECT["optional-dependencies"].values():
        declared |= {Requirement(r).name.lower().replace("_", "-") for r in extra}
    dists = importlib.metadata.packages_distributions()
    for module in imported_modules(ROOT / "server") | imported_modules(ROOT / "clients"):
        providers = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        assert providers & declared, f"{module} is imported but none of {providers} is declared in pyproject.toml"
    assert "tqdm" in declared


def test_dockerfile_installs_dependencies_before_copying_the_source() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    deps = next(i for i, line in enumerate(lines) if "pip install -r /tmp/requirements.txt" in line)
    source = next(i for i, line in enumerate(lines) if line.startswith("COPY server"))
    assert lines.index("COPY pyproject.toml ./") < deps < source
    assert "RUN pip install --no-deps ." in lines[source:]
    assert not any(line.startswith("COPY") and ("server" in line or "clients" in line) for line in lines[:deps])


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_publishes_on_loopback_and_an_empty_token_is_no_token() -> None:
    service = compose()["services"]["kronserve"]
    assert service["ports"] == ["${KRONSERVE_BIND:-127.0.0.1}:8000:8000"]
    assert service["environment"]["KRONSERVE_ADMIN_TOKEN"] == "${KRONSERVE_ADMIN_TOKEN:-}"
    from kronserve.config import Settings

    assert Settings(admin_token="").admin_token is None  # what compose passes when the variable is unset


def test_observability_profile_mounts_files_that_exist() -> None:
    services = compose()["services"]
    assert "profiles" not in services["kronserve"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
        assert all(p.startswith("${KRONSERVE_BIND:-127.0.0.1}:") for p in services[name]["ports"])
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert not source.startswith("./") or (ROOT / source).exists(), volume
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["kronserve:8000"]
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard()["panels"] if "datasource" in p}
    assert uids == {datasource["datasources"][0]["uid"]}


def dashboard() -> dict:
    return json.loads((ROOT / "deploy/grafana/dashboards/kronserve.json").read_text())


def queries() -> list[str]:
    """Every PromQL expression of the dashboard (panels and variables) and of the alert rules."""
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard()["templating"]["list"]]
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    exprs += [r["expr"] for group in rules["groups"] for r in group["rules"]]
    return exprs


def queried_metrics() -> set[str]:
    names = set()
    for expr in queries():
        names |= set(re.findall(r"\b((?:kronserve|process|python)_[a-z0-9_]+)\b", expr))
    return names


def test_the_kit_covers_what_the_issue_asks() -> None:
    metrics = queried_metrics()
    asked = {
        "kronserve_requests_total",  # rate by endpoint, 5xx/503
        "kronserve_request_failures_total",  # errors by endpoint
        "kronserve_request_latency_seconds_bucket",  # p50/p99
        "kronserve_queue_depth",
        "kronserve_queue_capacity",
        "kronserve_queue_wait_seconds_bucket",
        "kronserve_batch_rows_bucket",
        "kronserve_batch_tasks_bucket",
        "kronserve_adapter_loads_total",
        "kronserve_adapter_load_failures_total",
        "kronserve_task_requests_total",
        "kronserve_generated_tokens_total",
        "process_resident_memory_bytes",
    }
    assert asked <= metrics, asked - metrics
    groups = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
    alerts = {r["alert"] for g in groups for r in g["rules"]}
    assert {"KronserveHigh5xxRate", "KronserveShedding503", "KronserveHighP99Latency"} <= alerts
    assert {"KronserveQueueNearFull", "KronserveAdapterLoadFailures"} <= alerts

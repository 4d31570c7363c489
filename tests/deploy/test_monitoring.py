"""Monitoring profile: the Prometheus config and alert rules pass promtool (and the alerts fire
when they should), the Grafana dashboard is provisioned against that Prometheus, its queries are
valid PromQL, and every metric and label it and the alerts use is one a real API and a real
`sitefit worker` export after running a job."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sitefit.jobs import JobStatus
from sitefit.report import MODES
from sitefit.settings import Settings
from tests.conftest import PhantomCase
from tests.deploy.stack import DOCKER, REPO, load_yaml, resolved_stack, tool
from tests.server.helpers import client, make_home, service_settings, upload, wait_for_status
from tests.server.processes import RedisProcess, WorkerProcess, free_port, service_env
from worker.job import Outcome

DASHBOARD = DOCKER / "grafana" / "dashboards" / "sitefit.json"
PROVISIONING = DOCKER / "grafana" / "provisioning"
RULES = DOCKER / "prometheus-rules.yml"
QUEUE = "monitoring"
# Grafana's interval variables, as Prometheus would receive them
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "6h"}
# series Prometheus makes itself for every target
PROMETHEUS_METRICS = {"up"}
PROMETHEUS_LABELS = {"job", "instance"}
# only a worker that sees a GPU exports these (a CPU machine's worker has none)
GPU_ONLY = {"sitefit_gpu_memory_bytes": ("device", "kind")}
# label values a query may filter on before a scrape has shown them (one job shows few)
LABEL_VALUES = {"outcome": set(get_args(Outcome)), "status": set(get_args(JobStatus)),
                "mode": set(MODES)}  # fmt: skip
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                 "unless", "bool", "offset", "inf", "nan"}  # fmt: skip


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return resolved_stack()


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
        if "expr" in target
    ]
    assert queries
    return queries


def alert_queries() -> list[str]:
    rules = load_yaml(RULES.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def as_prometheus_gets_it(query: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    return query


# -- promtool ---------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    command = [tool("promtool", "prometheus"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_prometheus_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    config = load_yaml((DOCKER / "prometheus.yml").read_text())
    # as in the container, with the rule file where the config finds it
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    config["rule_files"] = [str(RULES)]
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    done = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_queries())} rules found" in done.stdout
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{index}", "expr": as_prometheus_gets_it(query)}
        for index, query in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_broken_query_fails_that_check(tmp_path: Path) -> None:
    path = tmp_path / "broken.yml"
    rule = {"record": "dashboard:broken", "expr": "sum by (mode (rate(sitefit_jobs[1m]))"}
    path.write_text(json.dumps({"groups": [{"name": "broken", "rules": [rule]}]}))
    assert promtool("check", "rules", str(path)).returncode != 0


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    api = {"job": "sitefit-api", "instance": "api:8000"}
    worker = {"job": "sitefit-worker", "instance": "10.0.0.5:9100"}

    def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
        text = ",".join(f'{key}="{value}"' for key, value in labels.items())
        return {"series": f"{name}{{{text}}}", "values": values}

    def alert(name: str, at: str, *fired: dict[str, Any]) -> dict[str, Any]:
        return {"eval_time": at, "alertname": name, "exp_alerts": list(fired)}

    busy = {
        "interval": "1m",
        "input_series": [
            series("up", api, "1x40"),
            series("up", worker, "0x40"),
            series("sitefit_queue_depth", api, "25x40"),
            series("sitefit_deliveries_failed", api, "0 0 0 2x37"),
            series("sitefit_site_store_integrity_errors_total", worker, "0 0 0 1x37"),
            series(
                "sitefit_worker_jobs_total",
                {**worker, "outcome": "failed", "mode": "adapt"},
                "0+1x40",
            ),
            series(
                "sitefit_worker_jobs_total",
                {**worker, "outcome": "finished", "mode": "adapt"},
                "0+1x40",
            ),
        ],
        "alert_rule_test": [
            alert("SitefitApiDown", "10m"),
            alert("SitefitQueueUnreachable", "10m"),
            alert("SitefitQueueBacklog", "10m"),  # not yet: it must last 15 minutes
            alert(
                "SitefitQueueBacklog",
                "20m",
                {
                    "exp_labels": {**api, "severity": "warning"},
                    "exp_annotations": {"summary": "25 jobs have waited 15 minutes: add workers"},
                },
            ),
            alert(
                "SitefitNoWorkers",
                "10m",
                {
                    "exp_labels": {"severity": "critical"},
                    "exp_annotations": {"summary": "no sitefit worker answers: queued jobs wait"},
                },
            ),
            alert(
                "SitefitDeliveriesFailed",
                "10m",
                {
                    "exp_labels": {**api, "severity": "warning"},
                    "exp_annotations": {
                        "summary": "2 results could not be sent to their PACS "
                        "destination (GET /v1/deliveries)"
                    },
                },
            ),
            alert(
                "SitefitSiteWeightsCorrupt",
                "10m",
                {
                    "exp_labels": {**worker, "severity": "warning"},
                    "exp_annotations": {
                        "summary": "site weights failed their checksum; jobs used "
                        "the base model (sitefit sites history)"
                    },
                },
            ),
            alert(
                "SitefitJobsFailing",
                "35m",
                {
                    "exp_labels": {"severity": "warning"},
                    "exp_annotations": {
                        "summary": "more than 20% of jobs fail: see the failed "
                        "jobs' errors (GET /v1/jobs/ID)"
                    },
                },
            ),
        ],
    }
    redis_down = {  # the API answers, but has no queue depth to give
        "interval": "1m",
        "input_series": [series("up", api, "1x10"), series("up", worker, "1x10")],
        "alert_rule_test": [
            alert("SitefitNoWorkers", "5m"),
            alert(
                "SitefitQueueUnreachable",
                "5m",
                {
                    "exp_labels": {**api, "severity": "critical"},
                    "exp_annotations": {
                        "summary": "the API cannot reach Redis (no queue depth): uploads answer 503"
                    },
                },
            ),
        ],
    }
    path = tmp_path / "alerts-test.yml"
    path.write_text(json.dumps({"rule_files": [str(RULES)], "tests": [busy, redis_down]}))
    done = promtool("test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


# -- scrape targets and Grafana provisioning --------------------------------------------------


def test_prometheus_scrapes_the_api_and_every_worker(stack: dict[str, Any]) -> None:
    services = stack["services"]
    config = load_yaml((DOCKER / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"sitefit-api", "sitefit-worker"}
    api_port = services["api"]["command"][services["api"]["command"].index("--port") + 1]
    assert jobs["sitefit-api"]["static_configs"] == [{"targets": [f"api:{api_port}"]}]
    (discovery,) = jobs["sitefit-worker"]["dns_sd_configs"]
    workers = [name for name, service in services.items() if "worker" in service.get("command", ())]
    assert sorted(discovery["names"]) == sorted(workers)
    for name in workers:
        command = services[name]["command"]
        assert int(command[command.index("--metrics-port") + 1]) == discovery["port"]


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(stack: dict[str, Any]) -> None:
    grafana = stack["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"] if volume.startswith("/"))
    assert mounts[str(PROVISIONING)] == "/etc/grafana/provisioning"
    (source,) = load_yaml((PROVISIONING / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    prometheus_port = stack["services"]["prometheus"]["ports"][0].rsplit(":", 1)[-1]
    assert source["url"] == f"http://prometheus:{prometheus_port.split('/')[0]}"
    (provider,) = load_yaml((PROVISIONING / "dashboards" / "sitefit.yml").read_text())["providers"]
    assert mounts[str(DASHBOARD.parent)] == provider["options"]["path"]
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home == Path(provider["options"]["path"]) / DASHBOARD.name
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "sitefit"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
            assert panel["targets"], panel["title"]


def test_the_dashboard_shows_what_operators_watch() -> None:
    used = {name for query in dashboard_queries() for name in metric_names(query)}
    for metric in (
        "sitefit_queue_depth",
        "sitefit_jobs",  # by status and mode
        "sitefit_worker_jobs_total",
        "sitefit_job_duration_seconds_bucket",
        "sitefit_job_stage_duration_seconds_bucket",
        "sitefit_refinement_epochs_sum",
        "sitefit_self_consistency_dice_sum",
        "sitefit_model_cache_hits_total",
        "sitefit_gpu_memory_bytes",
        "sitefit_deliveries_total",
        "sitefit_deliveries_failed",
    ):
        assert metric in used, metric


# -- the queries against real /metrics ----------------------------------------------------------


@dataclass
class Exports:
    """Series names a scrape can return, and the label names and values seen in samples."""

    names: set[str] = field(default_factory=set)
    labels: dict[str, set[str]] = field(default_factory=dict)
    values: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def add(self, exposition: str) -> None:
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"),
        }
        for family in text_string_to_metric_families(exposition):
            for suffix in suffixes.get(family.type, ("",)):
                self.names.add(family.name + suffix)
            for sample in family.samples:
                self.labels.setdefault(sample.name, set()).update(sample.labels)
                for label, value in sample.labels.items():
                    self.values.setdefault((sample.name, label), set()).add(value)


@pytest.fixture(scope="module")
def exports(
    tmp_path_factory: pytest.TempPathFactory,
    settings: Settings,
    brain_model: str,
    shifted_brain_case: PhantomCase,
) -> Iterator[Exports]:
    """A real API (Redis mode, as in docker-compose.yml) and `sitefit worker --metrics-port`,
    scraped after one adapt job ran, so that histograms and labelled series have samples."""
    root = tmp_path_factory.mktemp("monitoring")
    redis = RedisProcess(root)
    redis.start()
    home = make_home(root, settings.models_dir)
    worker = WorkerProcess(
        service_env(home, redis.url, QUEUE), root / "worker.log", metrics_port=free_port()
    )
    try:
        worker.start()
        app_settings = service_settings(home, redis_url=redis.url, queue_name=QUEUE)
        with client(app_settings) as api:
            created = upload(api, shifted_brain_case.image, brain_model, mode="adapt")
            assert created.status_code == 202, created.text
            job = wait_for_status(api, created.json()["id"], ("finished", "failed"), timeout=300)
            assert job["status"] == "finished", job
            found = Exports()
            found.add(api.get("/metrics").text)
        url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            found.add(response.read().decode())
        yield found
    finally:
        worker.stop()
        redis.stop()


def metric_names(query: str) -> set[str]:
    """The series names a PromQL query selects (not functions, keywords or labels)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', as_prometheus_gets_it(query))
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)  # matchers, ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = re.findall(r"(?<![\w:.])([A-Za-z_:][\w:]*)\b(?!\s*\()", text)
    return {name for name in names if name.lower() not in _PROMQL_WORDS}


def label_uses(query: str) -> tuple[list[tuple[str, str, str]], set[str]]:
    """(metric, label, value) of each equality matcher, and the labels grouped by."""
    matchers = [
        (metric, label, value)
        for metric, body in re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", query)
        for label, value in re.findall(r'(\w+)\s*=\s*"([^"]*)"', body)
    ]
    grouped = {
        label.strip()
        for labels in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", query)
        for label in labels.split(",")
        if label.strip()
    }
    return matchers, grouped


def test_query_parsing_finds_names_and_labels() -> None:
    query = (
        'histogram_quantile(0.95, sum by (le, stage) (rate(x_bucket{outcome="finished"}'
        "[$__rate_interval]))) / on(instance) y_total unless z"
    )
    assert metric_names(query) == {"x_bucket", "y_total", "z"}
    assert label_uses(query) == ([("x_bucket", "outcome", "finished")], {"le", "stage", "instance"})


def test_dashboard_and_alerts_use_only_what_sitefit_exports(exports: Exports) -> None:
    gpu_source = (REPO / "worker" / "worker_metrics.py").read_text()
    scrape_jobs = {"sitefit-api", "sitefit-worker"}
    for query in dashboard_queries() + alert_queries():
        names = metric_names(query)
        for name in names - PROMETHEUS_METRICS:
            if name in GPU_ONLY and name not in exports.names:  # a CPU-only machine
                assert f'"{name}"' in gpu_source and json.dumps(list(GPU_ONLY[name])) in gpu_source
                continue
            assert name in exports.names, f"{name} (in {query!r}) is not exported"
        matchers, grouped = label_uses(query)
        known = set(PROMETHEUS_LABELS)
        for name in names:
            known |= exports.labels.get(name, set()) | set(GPU_ONLY.get(name, ()))
            if name.endswith("_bucket"):
                known.add("le")
        # labels show in samples only: a series nothing has counted yet cannot be checked
        unseen = names - set(exports.labels) - PROMETHEUS_METRICS - set(GPU_ONLY)
        if not unseen:
            assert grouped <= known, f"{query!r} groups by labels {grouped - known}"
        for metric, label, value in matchers:
            if label == "job":
                assert value in scrape_jobs, query
            elif (metric, label) in exports.values:
                seen = exports.values[(metric, label)] | LABEL_VALUES.get(label, set())
                assert value in seen, f"{label}={value!r} in {query!r}"
            elif metric in exports.labels:
                raise AssertionError(f"{metric} has no label {label!r} ({query!r})")

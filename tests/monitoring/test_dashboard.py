"""The Grafana dashboard and provisioning files: structure checked offline (no Grafana server is obtainable here),
every query run against a real Prometheus."""

from __future__ import annotations

import re
import subprocess
from contextlib import ExitStack
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from monitoring.labeljoin import JoinMetrics
from monitoring.metrics import Metrics
from tests.fixtures.procs import free_port, require_binary
from tests.fixtures.prometheus import PrometheusServer, running_prometheus
from tests.monitoring.promql import (
    DASHBOARD,
    MONITORING,
    alert_exprs,
    as_bool,
    dashboard_exprs,
    load_dashboard,
    panels,
    unless_parts,
)

PROVISIONING = MONITORING / "grafana" / "provisioning"
REQUIRED = {
    f"streamcl_{name}"
    for name in [
        "samples_total",
        "dead_letter_total",
        "online_accuracy",
        "accuracy",
        "class_accuracy",
        "forgetting",
        "class_forgetting",
        "drift_detected_total",
        "drift_statistic",
        "learn_step_seconds_bucket",
        "samples_per_second",
        "buffer_size",
        "buffer_class_samples",
        "consumer_lag",
        "classes_seen",
        "checkpoint_age_seconds",
        "model_info",
        "buffer_errors_total",
        "dead_letter_spool_records",
        "dead_letter_sink_up",
        "dead_letter_rejected_total",
    ]
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_structure() -> None:
    dash = load_dashboard()
    for key in ("title", "uid", "panels", "schemaVersion", "annotations", "templating"):
        assert key in dash, key
    ids = [p["id"] for p in panels(dash["panels"])]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    data_panels = [p for p in panels(dash["panels"]) if p["type"] != "row"]
    assert len(data_panels) >= 15
    for panel in data_panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip(), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
    drift = [a for a in dash["annotations"]["list"] if a.get("name") == "Drift"]
    assert drift and "streamcl_drift_detected_total" in drift[0]["expr"] and drift[0]["datasource"] == DATASOURCE
    titles = {p["title"] for p in data_panels}
    assert {"Buffer errors", "Dead-letter spool", "Dead-letter sink up", "Process memory"} <= titles
    assert {"Waiting for a label", "Labels joined, unmatched, expired", "Label delay"} <= titles
    assert {"Group: records learned per second", "Group: consumer lag", "Group: workers up"} <= titles


def group_panels() -> dict[str, dict[str, str]]:
    """The group row's panels: title → refId → expr, variables as Grafana sets them for every job and worker."""
    values = {"$job": "stream-cl", "$instance": ".+", "$__rate_interval": "1m"}
    found = {}
    for p in panels(load_dashboard()["panels"]):
        if p["title"].startswith("Group: "):
            exprs = {}
            for t in p["targets"]:
                expr = t["expr"]
                for name, value in values.items():
                    expr = expr.replace(name, value)
                exprs[t["refId"]] = expr
            found[p["title"].removeprefix("Group: ")] = exprs
    return found


def test_group_panels_add_up_the_workers_of_a_job_scraped_as_the_prometheus_config_says(tmp_path: Path) -> None:
    """Two workers' endpoints (serve --workers 2 serves worker r on --metrics-port + r), scraped by a real
    Prometheus with the project's stream-cl job and its ``worker`` target labels: the group panels sum the
    workers' rates and lags, take the most behind partition and the slowest worker, and count the workers."""
    (job,) = yaml.safe_load((MONITORING / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    ports = [free_port(), free_port()]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{p}"], "labels": {"worker": str(r)}} for r, p in enumerate(ports)]
    workers = [Metrics(CollectorRegistry()) for _ in ports]
    for rank, metrics in enumerate(workers):
        metrics.consumer_lag.labels(topic="samples", partition=str(rank)).set(3 + 4 * rank)  # 3 and 7
        metrics.consumer_lag.labels(topic="samples", partition=str(rank + 2)).set(1)
    with running_prometheus(tmp_path, [job], ports[0]) as prometheus, ExitStack() as serving:
        for metrics, port in zip(workers, ports, strict=True):
            serving.enter_context(metrics.serve(port))
        for step in range(3):  # rates need scrapes that differ; the second worker learns 3x as fast, the slowest
            for rank, metrics in enumerate(workers):
                metrics.samples.labels(outcome="learned").inc(10 * (1 + 2 * rank) * (step + 1))
                metrics.learn_step.observe(0.01 * (1 + 9 * rank))
            assert prometheus.wait_for(f'count(streamcl_samples_total{{worker="1"}} >= {30 * (step + 1)}) > 0')
        group = group_panels()
        learned = group["records learned per second"]
        assert prometheus.wait_for(f"{learned['A']} > 0")
        # each worker's target is scraped on its own: wait until both have two samples that differ
        assert prometheus.wait_for(f"count({learned['B']} > 0) == 2")
        assert prometheus.wait_for("count(rate(streamcl_learn_step_seconds_count[1m]) > 0) == 2")
        per_worker = prometheus.series(learned["B"])
        assert sorted(s["metric"]["instance"] for s in per_worker) == sorted(f"127.0.0.1:{p}" for p in ports)
        assert {s["metric"]["worker"] for s in prometheus.series("streamcl_samples_total")} == {"0", "1"}
        # the group's rate is the sum of the workers' (one query: one evaluation time)
        (diff,) = prometheus.series(f"{learned['A']} - on (job) sum by (job) ({learned['B']})")
        (total,) = prometheus.series(learned["A"])
        assert float(total["value"][1]) > 0 and abs(float(diff["value"][1])) < 1e-9
        lag = group["consumer lag"]
        assert [float(s["value"][1]) for s in prometheus.series(lag["A"])] == [3 + 7 + 1 + 1]
        assert [float(s["value"][1]) for s in prometheus.series(lag["B"])] == [7]
        up = group["workers up"]
        assert [float(s["value"][1]) for s in prometheus.series(up["A"])] == [2]
        assert [float(s["value"][1]) for s in prometheus.series(up["B"])] == [2]
        step = group["slowest and fastest worker's step"]
        (slowest,), (fastest,) = prometheus.series(step["A"]), prometheus.series(step["B"])
        assert float(slowest["value"][1]) > float(fastest["value"][1])


def test_datasource_and_job_are_template_variables() -> None:
    """No datasource uid is hard-coded: any Prometheus datasource works; ``$job`` narrows every query."""
    text = DASHBOARD.read_text()
    assert '"uid": "prometheus"' not in text
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["query"]["query"] == "label_values(streamcl_samples_total, job)"
    assert 'job=~"$job"' in variables["instance"]["query"]["query"]
    for name in ("job", "instance"):
        assert variables[name]["datasource"] == DATASOURCE
    raw = [t["expr"] for p in panels(load_dashboard()["panels"]) for t in p.get("targets", [])]
    raw += [a["expr"] for a in load_dashboard()["annotations"]["list"] if "expr" in a]
    for expr in raw:
        assert expr.count('job=~"$job"') == expr.count('instance=~"$instance"') >= 1, expr


def test_every_panel_query_returns_series_from_a_real_prometheus(prometheus: PrometheusServer) -> None:
    """Each panel and annotation query, with ``$job`` and ``$instance`` set as Grafana would set them from the
    server's own label values, runs against Prometheus scraping a populated exporter and returns series."""
    metrics = Metrics(CollectorRegistry(), dead_letter_reasons=("bad_json",))
    join = JoinMetrics(metrics.registry)
    populate(metrics, join)
    with metrics.serve(prometheus.target_port):
        assert prometheus.wait_for("streamcl_buffer_errors_total"), prometheus.log.read_text()[-2000:]
        count_up(metrics, join)  # rates and increases need two scrapes that differ
        assert prometheus.wait_for("increase(streamcl_buffer_errors_total[1m]) > 0"), prometheus.log.read_text()[-2000:]
        variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
        (job,) = variable_values(prometheus, variables["job"]["query"]["query"])
        query = variables["instance"]["query"]["query"].replace("$job", job)
        instance = next(i for i in variable_values(prometheus, query) if i.endswith(f":{prometheus.target_port}"))
        values = {"$job": job, "$instance": instance, "$__rate_interval": "1m"}
        missing = {}
        for where, expr in raw_exprs(load_dashboard()):
            for name, value in values.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, expr
            if not prometheus.series(as_bool(expr) if where.startswith("annotation") else expr):  # status: success
                missing[where] = expr
        assert not missing, f"no series for: {missing}"


def variable_values(prometheus: PrometheusServer, query: str) -> list[str]:
    """What Grafana offers for a ``label_values(metric{...}, label)`` variable, read from the server."""
    selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", query).groups()
    return sorted({s["metric"][label] for s in prometheus.series(selector)})


def raw_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """Panel and annotation queries as written in the dashboard, variables included."""
    found = [
        (f"panel {p['title']} {t['refId']}", t["expr"])
        for p in panels(dashboard["panels"])
        for t in p.get("targets", [])
    ]
    return found + [(f"annotation {a['name']}", a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]


def populate(metrics: Metrics, join: JoinMetrics) -> None:
    """A series in every family the dashboard reads."""
    metrics.describe(method="er", model="mlp", device="cpu")
    for level in ("0", "1"):
        for family in (metrics.online_accuracy, metrics.accuracy, metrics.forgetting, metrics.classes_seen):
            family.labels(level=level).set(0.5)
        metrics.class_accuracy.labels(level=level, **{"class": "a"}).set(0.5)
        metrics.class_forgetting.labels(level=level, **{"class": "a"}).set(0.1)
    metrics.drift_statistic.labels(detector="adwin", signal="error").set(0.2)
    metrics.samples_per_second.set(50)
    metrics.buffer_size.set(20)
    metrics.buffer_class_count.labels(level="0", **{"class": "a"}).set(20)
    metrics.consumer_lag.labels(topic="samples", partition="0").set(3)
    metrics.overloaded.set(0)
    metrics.checkpoint_age.set(5)
    metrics.dead_letter_spool.set(2)
    metrics.dead_letter_sink_up.set(1)
    metrics.dead_letter_rejected.inc(0)  # not more: the alert would fire on the shared server for an hour
    join.pending.set(4)
    join.waiting.set(1)
    count_up(metrics, join)


def count_up(metrics: Metrics, join: JoinMetrics) -> None:
    """Move every counter and histogram the dashboard takes a rate or increase of."""
    metrics.samples.labels(outcome="learned").inc(10)
    metrics.dead_letters.labels(reason="bad_json").inc()
    metrics.predictions.inc()
    metrics.predictions_failed.labels(reason="delivery_failed").inc()
    metrics.learn_step.observe(0.01)
    metrics.decode_seconds.observe(0.001)
    metrics.buffer_errors.inc()
    metrics.drift_detected.labels(detector="adwin", signal="error").inc()
    metrics.overload_records.labels(policy="skip-learning").inc()
    metrics.offsets_skipped.labels(reason="out_of_range").inc()
    metrics.drift_non_finite.labels(signal="error").inc()
    join.labels.labels(outcome="joined").inc()
    join.expired.inc()
    join.delay.observe(30)


def test_every_expr_is_valid_promql(tmp_path: Path) -> None:
    """Each dashboard and alert expression, written as a recording rule, passes ``promtool check rules``."""
    exprs = [e for _, e in dashboard_exprs(load_dashboard())] + [e for _, e in alert_exprs()]
    rules = {"groups": [{"name": "exprs", "rules": [{"record": f"expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([require_binary("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout


def test_exprs_use_only_contract_metrics() -> None:
    """A typo in a metric name would give an empty panel; every ``streamcl_*`` name must be exported."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    JoinMetrics(registry)
    lazy = (metrics.checkpoint_age, metrics.dead_letter_spool, metrics.dead_letter_sink_up, metrics.assigned_partitions)
    for on_first_use in lazy:
        on_first_use.set(0)
    metrics.dead_letter_rejected.inc(0)
    suffixes = {"counter": ["_total"], "info": ["_info"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    exported = {f.name + suffix for f in registry.collect() for suffix in suffixes[f.type]}
    exprs = [e for _, e in dashboard_exprs(load_dashboard())] + [e for _, e in alert_exprs()]
    used = {name for e in exprs for name in re.findall(r"streamcl_\w+", e)}
    assert used - exported == set()
    assert REQUIRED - used == set(), "the issue's metrics contract must be on the dashboard or in an alert"


def test_provisioning_points_at_the_dashboard() -> None:
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "stream-cl.yml").read_text())["providers"]
    assert providers[0]["type"] == "file" and providers[0]["options"]["path"]
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasources[0]["type"] == "prometheus" and datasources[0]["url"].startswith("http")


def test_unless_parts_splits_only_top_level_unless() -> None:
    expr = 'a > 0 and b unless sum(c{d="unless"}) > 0 unless (e unless f)'
    assert unless_parts(expr) == ["a > 0 and b", 'sum(c{d="unless"}) > 0', "(e unless f)"]
    assert unless_parts("x_unlessy > 0") == ["x_unlessy > 0"]


def test_as_bool_rewrites_only_top_level_comparisons() -> None:
    assert (
        as_bool('sum(x{a!="b>c", c=~"d"}) == 0 and y > bool 1') == 'sum(x{a!="b>c", c=~"d"}) == bool 0 and y > bool 1'
    )

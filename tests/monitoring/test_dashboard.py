"""The Grafana dashboard and provisioning files, checked offline (no Grafana server is obtainable here)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from monitoring.metrics import Metrics
from tests.fixtures.procs import require_binary
from tests.monitoring.promql import MONITORING, alert_exprs, as_bool, dashboard_exprs, load_dashboard, panels

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
    ]
}


def test_dashboard_structure() -> None:
    dash = load_dashboard()
    for key in ("title", "uid", "panels", "schemaVersion", "annotations", "templating"):
        assert key in dash, key
    ids = [p["id"] for p in panels(dash["panels"])]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    datasource_uid = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][0][
        "uid"
    ]
    data_panels = [p for p in panels(dash["panels"]) if p["type"] != "row"]
    assert len(data_panels) >= 15
    for panel in data_panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource_uid}, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource_uid and target["expr"].strip(), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
    drift = [a for a in dash["annotations"]["list"] if a.get("name") == "Drift"]
    assert drift and "streamcl_drift_detected_total" in drift[0]["expr"]


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
    Metrics(registry)
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


def test_as_bool_rewrites_only_top_level_comparisons() -> None:
    assert (
        as_bool('sum(x{a!="b>c", c=~"d"}) == 0 and y > bool 1') == 'sum(x{a!="b>c", c=~"d"}) == bool 0 and y > bool 1'
    )

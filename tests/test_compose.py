"""``compose.yaml`` without Docker: valid against the Compose Specification schema, every mounted or copied file
exists, references resolve, and the service's settings file loads through ``stream-cl serve``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from stream_cl.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((Path(__file__).parent / "data" / "compose-spec.schema.json").read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def schema_errors(document: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_matches_the_compose_schema(compose: dict) -> None:
    assert schema_errors(compose) == []


def test_the_schema_check_can_fail(compose: dict) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["ports"] = "6379:6379"  # must be a list
    broken["services"]["kafka"]["healthcheck"]["intervall"] = "5s"  # unknown key
    assert len(schema_errors(broken)) == 2


def test_every_bind_mount_and_build_input_exists(compose: dict) -> None:
    named = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source in named:
                continue
            assert source.startswith("./"), f"{name}: {volume} is neither a named volume nor a ./ path"
            assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        if "build" in service:
            context = ROOT / (service["build"] if isinstance(service["build"], str) else service["build"]["context"])
            dockerfile = context / "Dockerfile"
            assert dockerfile.is_file()
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY "):
                    for source in line.split()[1:-1]:
                        assert (context / source).exists(), f"Dockerfile copies missing {source}"


def test_dependencies_resolve_and_health_conditions_have_healthchecks(compose: dict) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on undefined {dep}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
    assert {"kafka", "redis", "prometheus", "grafana", "stream-cl", "replayer"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "--appendonly" in services["redis"]["command"]


def test_prometheus_scrapes_the_learner_and_the_service_settings_load(
    compose: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    prometheus = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    service = compose["services"]["stream-cl"]
    mount = next(v for v in service["volumes"] if v.endswith("/etc/stream-cl/serve.yaml:ro"))
    for key in [k for k in os.environ if k.startswith("STREAMCL_") and k != "STREAMCL_TEST_THREADS"]:
        monkeypatch.delenv(key)
    for key, value in service["environment"].items():
        monkeypatch.setenv(key, value)
    assert main(["serve", "--config", str(ROOT / mount.split(":")[0]), "--print-config"]) == 0
    settings = yaml.safe_load(capsys.readouterr().out)
    assert f"stream-cl:{settings['metrics_port']}" in targets and settings["metrics_addr"] == "0.0.0.0"
    assert f"{settings['metrics_port']}:{settings['metrics_port']}" in service["ports"]
    assert re.fullmatch(r"kafka://kafka:9092/[\w.-]+", settings["source"])
    assert settings["checkpoint_dir"] in {v.split(":")[1] for v in service["volumes"]}
    replay = compose["services"]["replayer"]["command"]
    assert replay[replay.index("--to") + 1] == settings["source"]
    assert (ROOT / replay[1].removeprefix("/app/")).is_file()

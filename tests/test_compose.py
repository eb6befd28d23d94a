"""``compose.yaml`` and the ``Dockerfile`` without Docker: valid against the Compose Specification schema, every
mounted or copied file exists, references resolve, the service's settings files load through ``stream-cl serve``,
and the properties an operator relies on hold (loopback ports, a host Kafka listener, an ordered replay, a
dependency layer that code edits do not invalidate, a default config in the image)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from consumers.recorded import read_messages
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
    assert f"127.0.0.1:{settings['metrics_port']}:{settings['metrics_port']}" in service["ports"]
    assert re.fullmatch(r"kafka://kafka:9092/[\w.-]+", settings["source"])
    assert settings["checkpoint_dir"] in {v.split(":")[1] for v in service["volumes"]}
    replay = compose["services"]["replayer"]["command"]
    assert replay[replay.index("--to") + 1] == settings["source"]
    assert (ROOT / replay[1].removeprefix("/app/")).is_file()


DOCKERFILE = (ROOT / "Dockerfile").read_text()
INSTRUCTIONS = [
    (line.split()[0], line.split(maxsplit=1)[1])
    for line in re.sub(r"\\\n\s*", " ", DOCKERFILE).splitlines()
    if line.strip() and not line.startswith("#")
]
"""``(INSTRUCTION, arguments)`` in order, continuation lines joined."""


def print_config(path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> dict:
    for key in [k for k in os.environ if k.startswith("STREAMCL_") and k != "STREAMCL_TEST_THREADS"]:
        monkeypatch.delenv(key)
    assert main(["serve", "--config", str(path), "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_every_published_port_is_bound_to_loopback(compose: dict) -> None:
    published = [(name, port) for name, service in compose["services"].items() for port in service.get("ports", [])]
    assert {name for name, _ in published} >= {"kafka", "stream-cl", "prometheus", "grafana"}
    for name, port in published:
        assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_kafka_has_a_listener_for_the_host(compose: dict) -> None:
    kafka = compose["services"]["kafka"]
    env = kafka["environment"]
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(advertised) <= set(listeners) <= set(protocols)
    assert advertised["PLAINTEXT"] == "kafka:9092"  # what the containers use (deploy/serve.yaml, the replayer)
    host_listener = next(name for name, address in advertised.items() if address.startswith("localhost:"))
    port = advertised[host_listener].split(":")[1]
    assert listeners[host_listener] == f":{port}" and f"127.0.0.1:{port}:{port}" in kafka["ports"]


def test_the_replayed_stream_keeps_its_order(compose: dict) -> None:
    """The shipped stream has no keys; Kafka's partitioner would spread it over the topic's partitions and the
    learner would read them interleaved. The replayer keeps the recorded partition, which is one for all."""
    command = compose["services"]["replayer"]["command"]
    assert "--keep-partitions" in command
    messages = list(read_messages(ROOT / command[1].removeprefix("/app/")))
    assert {m.position.partition for m in messages} == {0} and all(m.key is None for m in messages)


def test_dockerfile_installs_dependencies_before_copying_code() -> None:
    """A code edit invalidates only the layers after the code's COPY: torch and the rest stay cached."""
    installs = [i for i, (op, args) in enumerate(INSTRUCTIONS) if op == "RUN" and "pip install" in args]
    dependencies = [i for i in installs if "--no-deps" not in INSTRUCTIONS[i][1]]
    project = [i for i in installs if "--no-deps" in INSTRUCTIONS[i][1]]
    assert dependencies and project and max(dependencies) < min(project)
    copies_before = [args for op, args in INSTRUCTIONS[: max(dependencies)] if op == "COPY"]
    assert copies_before == ["pyproject.toml deploy/constraints.txt ./"]
    code = [i for i, (op, args) in enumerate(INSTRUCTIONS) if op == "COPY" and "stream_cl" in shlex.split(args)]
    assert code and max(dependencies) < code[0] < min(project)
    steps = [INSTRUCTIONS[i][1] for i in dependencies]
    assert any("torch" in a and "-c constraints.txt" in a for a in steps)
    assert any("-r requirements.txt" in a and "-c constraints.txt" in a for a in steps)


def test_constraints_pin_every_dependency_within_its_range() -> None:
    pins = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dependency in map(Requirement, project["dependencies"]):
        name = canonicalize_name(dependency.name)
        assert name in pins, f"{name} is not pinned in deploy/constraints.txt"
        assert dependency.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {dependency}"


def test_base_image_and_torch_index_are_build_arguments() -> None:
    args = [a for op, a in INSTRUCTIONS if op == "ARG"]
    assert INSTRUCTIONS[0][0] == "ARG" and INSTRUCTIONS[0][1].startswith("BASE_IMAGE=")
    assert ("FROM", "${BASE_IMAGE}") in INSTRUCTIONS
    assert any(a.startswith("TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") for a in args)
    assert any('--index-url "${TORCH_INDEX_URL}"' in a for op, a in INSTRUCTIONS if op == "RUN")


def test_the_image_serves_without_arguments_on_all_interfaces(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``docker run -p 9108:9108 IMAGE``: the default command needs no --config, the baked-in settings bind the
    exposed port on 0.0.0.0, and their checkpoint directory is created for the image's user."""
    env = dict(a.split("=", 1) for op, a in INSTRUCTIONS if op == "ENV" and a.startswith("STREAMCL_CONFIG="))
    config_copy = next(shlex.split(a) for op, a in INSTRUCTIONS if op == "COPY" and a.startswith("deploy/"))
    assert config_copy[1] == env["STREAMCL_CONFIG"]
    assert json.loads(dict(INSTRUCTIONS)["CMD"]) == ["serve"]
    assert json.loads(dict(INSTRUCTIONS)["ENTRYPOINT"]) == ["stream-cl"]
    settings = print_config(ROOT / config_copy[0], monkeypatch, capsys)
    assert settings["metrics_addr"] == "0.0.0.0" and ("EXPOSE", str(settings["metrics_port"])) in INSTRUCTIONS
    assert any(settings["checkpoint_dir"] in a and "chown" in a for op, a in INSTRUCTIONS if op == "RUN")
    assert ("WORKDIR", "/app") in INSTRUCTIONS and ("COPY", "consumers consumers") in INSTRUCTIONS
    assert (ROOT / settings["source"].removeprefix("/app/")).is_file()  # the shipped stream, copied into /app


def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    sources = [s for op, a in INSTRUCTIONS if op == "COPY" for s in shlex.split(a)[:-1]]
    for source in sources:
        assert not any(fnmatch.fnmatch(source, p) for p in patterns), f"{source} is copied but .dockerignore drops it"
    assert {"tests", "benchmarks", ".git"} <= set(patterns)

"""Packaging: every imported distribution is declared, the wheel carries an SPDX licence, benchmarks are optional,
CITATION.cff and CHANGELOG.md are well-formed."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import jsonschema
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stream_cl", "consumers", "buffers", "monitoring")
BENCHMARK_CODE = [*(ROOT / "stream_cl" / "bench").rglob("*.py"), ROOT / "stream_cl" / "commands" / "bench.py"]
OPTIONAL_CLIENT = ROOT / "consumers" / "kafka_librdkafka.py"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def declared(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def imported_distributions(files: list[Path]) -> set[str]:
    """Distributions providing the third-party modules these files import (stdlib and our packages excluded)."""
    modules = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - set(PACKAGES) - {"__future__"}
    providers = packages_distributions()
    missing = {m for m in third_party if m not in providers}
    assert not missing, f"imported but not installed: {missing}"
    return {canonicalize_name(d) for m in third_party for d in providers[m]}


def test_every_import_outside_the_benchmarks_is_a_dependency() -> None:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p not in [*BENCHMARK_CODE, OPTIONAL_CLIENT]]
    used = imported_distributions(files)
    assert "scipy" in used and "matplotlib" not in used
    assert used - declared(PYPROJECT["dependencies"]) == set()


def test_benchmark_imports_are_dependencies_or_the_bench_extra() -> None:
    used = imported_distributions(BENCHMARK_CODE)
    extras = PYPROJECT["optional-dependencies"]
    assert "matplotlib" in used and "matplotlib" not in declared(PYPROJECT["dependencies"])
    assert {"matplotlib"} <= declared(extras["bench"]) & declared(extras["test"])
    assert used - declared(PYPROJECT["dependencies"] + extras["bench"]) == set()


def test_the_librdkafka_client_needs_only_its_extra() -> None:
    used = imported_distributions([OPTIONAL_CLIENT])
    extras = PYPROJECT["optional-dependencies"]
    assert "confluent-kafka" in used and "confluent-kafka" not in declared(PYPROJECT["dependencies"])
    assert used - declared(PYPROJECT["dependencies"] + extras["librdkafka"]) == set()


def test_kafka_python_floor_has_what_the_consumer_imports() -> None:
    """kafka-python 2.x lacks ``AsyncConsumerRebalanceListener`` (with 2.2 installed ``stream-cl --help`` died);
    with 3.0.0 to 3.0.8 the two-consumer split test of ``tests/consumers/test_kafka.py`` stalls in the rebalance."""
    kafka = next(Requirement(r) for r in PYPROJECT["dependencies"] if Requirement(r).name == "kafka-python")
    assert "2.2.21" not in kafka.specifier and "3.0.8" not in kafka.specifier and "3.0.9" in kafka.specifier


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_help_loads_no_benchmark_code() -> None:
    done = run_python(
        "import sys\n"
        "from stream_cl.cli import build_parser\n"
        "build_parser()\n"
        "print(sorted(m for m in sys.modules if m.startswith(('stream_cl.bench', 'matplotlib'))))\n"
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]", done


def test_bench_without_matplotlib_prints_the_install_hint() -> None:
    done = run_python(
        "import sys\n"
        "sys.modules['matplotlib'] = None  # as if not installed\n"
        "from stream_cl.cli import main\n"
        "sys.exit(main(['bench', 'buffer', '--capacity', '10']))\n"
    )
    assert done.returncode == 1, done
    assert done.stderr.strip().splitlines() == [
        "stream-cl: error: benchmarks need matplotlib: pip install 'stream-cl[bench]'"
    ]


def test_wheel_has_an_spdx_licence_and_the_licence_file(tmp_path: Path) -> None:
    source = tmp_path / "src"  # setuptools builds in the source tree: keep build/ and *.egg-info out of the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "tests"))
    wheel_command = ["pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)]
    done = subprocess.run(
        [sys.executable, "-m", *wheel_command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Deprecat" not in done.stdout + done.stderr
    (wheel,) = tmp_path.glob("stream_cl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        licence = archive.read(next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))).decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "Requires-Dist: scipy>=1.11" in metadata
    assert 'Requires-Dist: matplotlib>=3.8; extra == "bench"' in metadata


def test_citation_file_is_valid_cff_1_2_0() -> None:
    schema = json.loads((ROOT / "tests" / "data" / "citation-cff-1.2.0.schema.json").read_text())
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(citation)]
    assert errors == []
    assert citation["version"] == PYPROJECT["version"] and citation["license"] == PYPROJECT["license"]
    assert citation["authors"] == [{"name": "stream-cl developers"}]
    titles = {r["title"]: r for r in citation["references"]}
    onpro = titles["Online Prototype Learning for Online Continual Learning"]
    hle = titles["Online Continual Learning on Hierarchical Label Expansion"]
    assert (onpro["authors"][0]["family-names"], onpro["year"]) == ("Wei", 2023)
    assert (hle["authors"][0]["family-names"], hle["year"]) == ("Lee", 2023)
    assert all("ICCV" in r["conference"]["name"] for r in (onpro, hle))


def test_changelog_has_unreleased_and_the_current_version() -> None:
    headings = re.findall(r"^## \[(.+?)\]", (ROOT / "CHANGELOG.md").read_text(), flags=re.MULTILINE)
    assert headings[:2] == ["Unreleased", PYPROJECT["version"]]

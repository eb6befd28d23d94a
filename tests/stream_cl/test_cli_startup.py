"""The command line starts without the heavy libraries: the top-level help, the checkpoint, Kafka and benchmark
commands import neither torch nor scipy nor matplotlib nor river until they run (``run --help`` lists the
methods and models, so it loads them)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "scipy", "matplotlib", "river")


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["checkpoint", "--help"],
        ["record", "--help"],
        ["replay", "--help"],
        ["produce", "--help"],
        ["bench", "--help"],
        ["--version"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_starting_a_command_imports_no_heavy_library(argv: list[str]) -> None:
    code = (
        "import sys\nfrom stream_cl.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:] + done.stderr[-500:]

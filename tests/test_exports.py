"""Every name a package exports in ``__all__`` imports (catches stale re-exports)."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = ["stream_cl", "consumers", "buffers", "monitoring", "stream_cl.methods"]


@pytest.mark.parametrize("package", PACKAGES)
def test_all_names_import(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"

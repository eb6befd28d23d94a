"""Continual learning methods, one per file, found by name in :data:`METHODS`."""

from __future__ import annotations

import inspect

from stream_cl.methods.er import ER
from stream_cl.methods.er_hle import ERHLE
from stream_cl.methods.onpro import OnPro
from stream_cl.methods.onpro_hle import OnProHLE
from stream_cl.methods.pl_fms import PLFMS

METHODS: dict[str, type] = {"er": ER, "er-hle": ERHLE, "onpro": OnPro, "onpro-hle": OnProHLE, "pl-fms": PLFMS}
"""Method name → class. Each class takes ``(model, buffer, **hyper_parameters)``."""


def method_class(name: str) -> type:
    """The class registered as ``name``.

    Raises
    ------
    ValueError
        For an unknown name, listing the choices.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}") from None


def hyper_parameters(name: str) -> list[str]:
    """The hyper-parameters method ``name`` takes: its constructor's keyword-only parameters, and those of the
    base class's constructor where it passes ``**kwargs`` on."""
    names: list[str] = []
    for cls in method_class(name).__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(vars(cls)["__init__"]).parameters.values()
        names += [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in names]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return names


__all__ = ["ER", "ERHLE", "METHODS", "PLFMS", "OnPro", "OnProHLE", "hyper_parameters", "method_class"]

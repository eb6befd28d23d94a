"""Where the project's PromQL lives (dashboard panels and annotations, alert rules) and how to test it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "stream-cl.json"
RULES = MONITORING / "prometheus" / "rules.yml"
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "5m"}
COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)")
"""A comparison operator not already followed by ``bool``."""
UNLESS = re.compile(r"unless\b")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(items: list[dict]) -> Iterator[dict]:
    """Every panel, rows' nested panels included."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """``(where, expr)`` of every panel target and annotation query, Grafana variables as Prometheus sees them."""
    found = [
        (f"panel {p['id']} {t['refId']}", t["expr"]) for p in panels(dashboard["panels"]) for t in p.get("targets", [])
    ]
    found += [(f"annotation {a['name']}", a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]
    return [(where, to_promql(expr)) for where, expr in found]


def to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\w+", ".+", expr)  # template variables: match every value


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(r["alert"], r["expr"]) for group in rules["groups"] for r in group["rules"] if "alert" in r]


def as_bool(expr: str) -> str:
    """Turn filtering comparisons into ``bool`` ones, so a condition returns its series whether it holds or not.

    ``rate(x[5m]) > 0`` returns nothing while quiet; ``rate(x[5m]) > bool 0`` returns every series of
    ``rate(x[5m])`` with value 0 or 1: "returns data" then proves the metric names, labels and
    functions are right without having to make every alert fire. Label matchers (``{a!="b"}``) and
    strings are left alone.
    """
    out, depth, quote, i = [], 0, "", 0
    while i < len(expr):
        ch = expr[i]
        op = COMPARISON.match(expr, i) if not (quote or depth) else None
        if op:
            out.append(op.group(1) + " bool")
            i = op.end()
            continue
        if quote:
            quote = "" if ch == quote and expr[i - 1] != "\\" else quote
        elif ch in "\"'`":
            quote = ch
        elif ch in "{}":
            depth += 1 if ch == "{" else -1
        out.append(ch)
        i += 1
    return "".join(out)


def unless_parts(expr: str) -> list[str]:
    """``A unless B unless C`` as ``[A, B, C]``, split only outside parentheses, brackets, braces and strings.

    ``unless`` drops every series its right side returns, whatever their values, so a right side turned ``bool``
    (which always returns its series) would empty the whole expression: each part is checked on its own.
    """
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            quote = "" if ch == quote and expr[i - 1] != "\\" else quote
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif not depth and (found := UNLESS.match(expr, i)) and not re.match(r"\w", expr[i - 1 : i]):
            parts.append(expr[start:i].strip())
            start = i = found.end()
            continue
        i += 1
    return [*parts, expr[start:].strip()]

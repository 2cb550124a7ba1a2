"""The shipped alerting rules and dashboard, checked without a running kansas.

``promtool check rules`` and ``promtool test rules`` (every alert fires in a scenario of
its own and stays quiet in a neighbouring one); every alert has a summary and a runbook
section in docs/observability.md; the rules and the dashboard query only metrics that
kansas exposes (``SPECS``). The end-to-end half is tests/test_prometheus_e2e.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kansas.observe.metrics import SPECS

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "contrib" / "prometheus" / "kansas-alerts.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "kansas-alerts.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "kansas-dashboard.json"
DOC = ROOT / "docs" / "observability.md"

#: Metric names in PromQL: kansas's own and prometheus-client's process metrics (no
#: label or function of PromQL starts so).
METRIC = re.compile(r"\b(kansas_[a-z_]+|process_[a-z_]+)\b")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed (Debian's prometheus package; make test installs it)")
    return found


def alerts() -> list[dict[str, Any]]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def exposed_names() -> set[str]:
    names = set()
    for spec in SPECS:
        if spec.kind == "histogram":
            names |= {spec.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(spec.name)
    return names


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown file."""
    found = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_promtool_checks_the_rules() -> None:
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - fires == set(), "alerts no test makes fire"
    assert names - quiet == set(), "alerts no test checks are quiet"


def test_every_alert_has_a_summary_and_a_runbook_section() -> None:
    sections = anchors(DOC.read_text())
    for rule in alerts():
        notes = rule["annotations"]
        assert notes["summary"], rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        doc, _, anchor = notes["runbook_url"].partition("#")
        assert doc == "docs/observability.md", rule["alert"]
        assert anchor == rule["alert"].lower() and anchor in sections, rule["alert"]


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_only_metrics_kansas_exposes_are_queried(source: str) -> None:
    exprs = [r["expr"] for r in alerts()] if source == "rules" else dashboard_exprs()
    exposed = exposed_names()
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert used, "no metric found: the pattern is wrong"
    process = {"process_cpu_seconds_total", "process_resident_memory_bytes",
               "process_open_fds", "process_max_fds", "process_start_time_seconds"}  # fmt: skip
    assert used - exposed - process == set()


def test_the_dashboard_has_a_shard_variable_units_and_rows() -> None:
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert "shard" in variables and variables["shard"]["includeAll"]
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Traffic and errors", "Long-polls and parking", "Latency",
                    "Stores: Redis and PostgreSQL", "Moves", "Processes"]  # fmt: skip
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["unit"], panel["title"]
        assert defaults["thresholds"]["steps"], panel["title"]
        assert panel["description"], panel["title"]
        for target in panel["targets"]:
            if "shard" in target["expr"] and "by (shard" in target["expr"]:
                assert 'shard=~"$shard"' in target["expr"], panel["title"]

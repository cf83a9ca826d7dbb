"""deploy/prometheus/tapio-node.rules.yaml through promtool (Debian's
`prometheus`): the rules load, and their unit tests pass; the Grafana
dashboard is valid JSON whose queries use only metrics we export or
record."""
import json
import os
import re
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULES = os.path.join(REPO, "deploy", "prometheus", "tapio-node.rules.yaml")
RULE_TESTS = os.path.join(REPO, "tests", "unit", "prometheus", "tapio-node.rules.test.yaml")
DASHBOARD = os.path.join(REPO, "deploy", "grafana", "tapio-node.json")
PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if os.access("/usr/bin/promtool", os.X_OK) else None)

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="requires promtool (apt install prometheus)")


@needs_promtool
def test_rules_load():
    r = subprocess.run([PROMTOOL, "check", "rules", RULES], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_rule_unit_tests():
    r = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:kernel_monitor|tapio)[a-z0-9_:]*)", expr))


def test_dashboard_queries_use_known_series():
    import yaml

    with open(RULES) as f:
        recorded = {r["record"] for g in yaml.safe_load(f)["groups"] for r in g["rules"] if "record" in r}
    exported = {"kernel_monitor_volume_mounted", "kernel_monitor_last_access_timestamp_seconds",
                "kernel_monitor_object_reads_total", "kernel_monitor_new_reader_total",
                "kernel_monitor_store_up", "kernel_monitor_store_errors_total",
                "kernel_monitor_secret_access_total", "kernel_monitor_configmap_access_total"}
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs, "no queries in the dashboard"
    for expr in exprs:
        assert _names_in(expr) <= recorded | exported, expr

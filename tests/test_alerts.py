"""The alert rules (deploy/prometheus/alerts.yaml): valid, unit-tested, linked to the runbook,
built on metrics the daemon exposes, and shipped unchanged as the Prometheus Operator's
PrometheusRule.

`promtool check rules` and `promtool test rules` run here, so `make test` runs them. The
PrometheusRule in the kustomize base is generated from the plain file:

    .venv/bin/python -m tests.test_alerts      # rewrites deploy/k8s/base/prometheusrule.yaml
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy import exposed_metric_names

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "alerts.yaml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yaml"
PROMETHEUS_RULE = REPO / "deploy" / "k8s" / "base" / "prometheusrule.yaml"
RUNBOOK = REPO / "docs" / "RUNBOOK.md"
RUNBOOK_URL = re.compile(r"https://\S+/docs/RUNBOOK\.md#(?P<anchor>[a-z0-9_-]+)")
SEVERITIES = {"critical", "warning"}

_GENERATED_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yaml: edit that file, then run
#   .venv/bin/python -m tests.test_alerts
# (tests/test_alerts.py fails while the two differ). The Prometheus Operator loads these rules;
# your Prometheus must select the object (kube-prometheus-stack: label `release: <its release>`
# unless ruleSelectorNilUsesHelmValues is false; see deploy/README.md).
"""

Rule = dict[str, Any]


def load_rules() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return document


def alerts() -> list[Rule]:
    return [rule for group in load_rules()["groups"] for rule in group["rules"] if "alert" in rule]


def prometheus_rule() -> dict[str, Any]:
    """The PrometheusRule object carrying the plain file's groups."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "textlocal-consumer",
            "labels": {"app.kubernetes.io/name": "textlocal-consumer"},
        },
        "spec": {"groups": load_rules()["groups"]},
    }


class _BlockStyleDumper(yaml.SafeDumper):
    """Multi-line strings (the longer expressions) as `|` blocks, as in the plain file."""


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockStyleDumper.add_representer(str, _represent_text)


def prometheus_rule_text() -> str:
    body = yaml.dump(
        prometheus_rule(), Dumper=_BlockStyleDumper, sort_keys=False, width=200, allow_unicode=True
    )
    return _GENERATED_HEADER + body


def promtool_path() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool is required in CI (Debian package `prometheus`)")
        pytest.skip("promtool not installed")
    return found


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool_path(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def runbook_anchors() -> dict[str, str]:
    """Anchor → heading for every heading of the runbook (GitHub's and GitLab's slugs)."""
    anchors = {}
    for line in RUNBOOK.read_text(encoding="utf-8").splitlines():
        if match := re.fullmatch(r"#{1,6} (.+)", line):
            heading = match.group(1).strip()
            slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
            anchors[slug] = heading
    return anchors


# --- promtool ------------------------------------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    """`promtool check rules` accepts the rules file."""
    result = run_promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_their_promtool_unit_tests() -> None:
    """`promtool test rules` passes: every alert fires and clears as alerts_test.yaml expects."""
    result = run_promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_clears_it() -> None:
    """For each alert, alerts_test.yaml has an evaluation where it fires (with its labels and
    annotations in full) and one where it does not."""
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    assert tests["rule_files"] == [RULES.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            expected = check.get("exp_alerts") or []
            (firing if expected else quiet).add(check["alertname"])
            for alert in expected:
                assert "runbook_url" in alert.get("exp_annotations", {}), check["alertname"]
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts never seen firing"
    assert names - quiet == set(), "alerts never seen clear"
    assert (firing | quiet) <= names, "tests of alerts that do not exist"


# --- the rules themselves ------------------------------------------------------------------------


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section() -> None:
    """Each alert: a unique name, a severity label, a summary, and a runbook_url that resolves
    to a heading of docs/RUNBOOK.md named after the alert; all links share one base URL."""
    anchors = runbook_anchors()
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names))
    bases = set()
    for rule in alerts():
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        url = rule["annotations"]["runbook_url"]
        match = RUNBOOK_URL.fullmatch(url)
        assert match, f"{rule['alert']}: {url}"
        assert anchors.get(match["anchor"]) == rule["alert"], f"{rule['alert']}: #{match['anchor']}"
        bases.add(url.split("#")[0])
    assert len(bases) == 1, bases


def test_every_runbook_section_belongs_to_an_alert() -> None:
    """No runbook section for an alert that no longer exists (headings named like alerts)."""
    names = {rule["alert"] for rule in alerts()}
    sections = {h for h in runbook_anchors().values() if h.startswith("TextLocalConsumer")}
    assert sections == names


def test_alerts_use_only_metrics_the_daemon_exposes() -> None:
    """Every textlocal_consumer_* name in an alert expression exists in the daemon's exposition
    (consumer.metrics on a fresh registry; counters as _total, histograms as _bucket/_count)."""
    exposed = exposed_metric_names()
    used = {
        name
        for rule in alerts()
        for name in re.findall(r"\btextlocal_consumer_[a-zA-Z0-9_]+", str(rule["expr"]))
    }
    assert len(used) >= 10
    assert used <= exposed, f"not exposed by consumer.metrics: {sorted(used - exposed)}"


def test_the_prometheus_rule_is_generated_from_the_plain_file() -> None:
    """deploy/k8s/base/prometheusrule.yaml holds exactly the plain file's groups (regenerate it
    with `python -m tests.test_alerts`), and the base kustomization ships it."""
    committed = PROMETHEUS_RULE.read_text(encoding="utf-8")
    assert yaml.safe_load(committed) == prometheus_rule(), (
        "prometheusrule.yaml differs from alerts.yaml: run `.venv/bin/python -m tests.test_alerts`"
    )
    assert committed == prometheus_rule_text()
    kustomization = yaml.safe_load(
        (PROMETHEUS_RULE.parent / "kustomization.yaml").read_text(encoding="utf-8")
    )
    assert PROMETHEUS_RULE.name in kustomization["resources"]


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(prometheus_rule_text(), encoding="utf-8")
    print(f"wrote {PROMETHEUS_RULE.relative_to(REPO)}", file=sys.stderr)

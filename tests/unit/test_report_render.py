"""The report's formats and the new-reader alert record, without a daemon."""
import json

import pytest

from tapio_node.report import parse_object
from tapio_node.report.render import render, table
from tapio_node.store.alerts import NEW_READER_MESSAGE_ID, NewReaderAlerts, alert_fields

UNUSED = [{"namespace": "shop", "pod": "web-7d4b9c-x2kqp", "workload": "Deployment/web", "kind": "secret",
           "name": "a-very-long-secret-name-" * 3, "volume": "db", "pods": 2, "key": None,
           "mounted_since": "2026-11-30T08:00:12Z"}]


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_table_fits_the_terminal(width):
    out = table("unused", UNUSED, width=width)
    assert max(len(line) for line in out.splitlines()) <= width
    assert "(whole" in out and "shop" in out


def test_summary_limits_rows_and_says_how_many_more():
    out = table("unused", UNUSED * 15, width=200, limit=10)
    assert "... 5 more (tapio-node report unused)" in out


def test_json_is_one_object_with_the_section_keys():
    out = json.loads(render({"unused": UNUSED, "cross_pod": []}, "json", "h", summary=True))
    assert list(out) == ["unused", "cross_pod"] and out["unused"][0]["key"] is None


def test_markdown_escapes_pipes():
    item = dict(UNUSED[0], name="a|b")
    assert "a\\|b" in render({"unused": [item]}, "markdown", "h", summary=False)


@pytest.mark.parametrize("text", ["shop", "/web", "shop/", "a/b/c"])
def test_object_needs_namespace_and_name(text):
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        parse_object(text)


KEY = ("shop", "web-1", "uid", "Deployment/web", "secret", "secret", "web-tls", "certs", "tls.key",
       "pod", "batch", "Deployment/snoop", "snoop-1", "c" * 64, "", "curl")


def test_the_alert_record_has_its_message_id_and_priority_warning():
    f = alert_fields(KEY)
    assert (f["MESSAGE_ID"], f["PRIORITY"], f["SYSLOG_IDENTIFIER"]) == (NEW_READER_MESSAGE_ID, "4", "tapio-node")
    assert f["MESSAGE"] == ("new reader: workload batch/Deployment/snoop read secret shop/web-tls "
                            "(key tls.key) for the first time")
    assert (f["TAPIO_CONFIG_NAME"], f["TAPIO_ACCESSOR_WORKLOAD"]) == ("web-tls", "Deployment/snoop")
    assert "TAPIO_HOST_CGROUP" not in f  # empty fields are left out


def test_without_journald_the_alert_is_one_stderr_line(tmp_path):
    import io

    out = io.StringIO()
    NewReaderAlerts(socket_path=str(tmp_path / "none"), stream=out).send(KEY)
    assert out.getvalue().startswith("<4>new reader: ") and out.getvalue().count("\n") == 1

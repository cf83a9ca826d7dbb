"""/metrics and /healthz over real HTTP on loopback (ephemeral ports), parsed with
prometheus_client's text parser; then a real Prometheus server scraping it
and `promtool check metrics` linting it, when Debian's `prometheus` is installed.

These need neither root nor BPF; they live here next to the other
real-component tests.
"""
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tapio_node.httpd import ListenError, parse_listen_address, serve
from tapio_node.metrics import DaemonState, Metrics
from tapio_node.sim.system import terminate


def state(**kw):
    base = dict(ebpf_loaded=True, ring_buffer_active=True, events_processed=42, ring_buffer_drops=0,
                watched_volumes=3, watched_files=9, watched_pods=2, last_event_age_seconds=1.5,
                loop_heartbeat_age_seconds=0.2, backend="tracepoint", status="watching 3 volumes")
    base.update(kw)
    return DaemonState(**base)


@pytest.fixture
def server():
    m = Metrics()
    current = {"s": state()}
    srv = serve("127.0.0.1:0", m, lambda: current["s"], stuck_after=30.0)
    try:
        yield srv, m, current
    finally:
        srv.close()


def get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def scrape(url) -> dict:
    code, headers, body = get(url + "/metrics")
    assert code == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_metrics_exact_counts_over_http(server):
    srv, m, _ = server
    for _ in range(250):
        m.access("secret_access", "prod", "db-credentials")
    m.access("configmap_access", "prod", "app-config", count=17)
    s = scrape(srv.url)
    assert s[("kernel_monitor_secret_access_total",
              frozenset({"namespace": "prod", "secret": "db-credentials"}.items()))] == 250
    assert s[("kernel_monitor_configmap_access_total",
              frozenset({"namespace": "prod", "configmap": "app-config"}.items()))] == 17
    assert s[("kernel_monitor_events_processed_total", frozenset())] == 42
    assert s[("kernel_monitor_watched_volumes", frozenset())] == 3
    m.access("secret_access", "prod", "db-credentials", count=5)
    s = scrape(srv.url)
    assert s[("kernel_monitor_secret_access_total",
              frozenset({"namespace": "prod", "secret": "db-credentials"}.items()))] == 255


def test_healthz_healthy_body(server):
    srv, _, _ = server
    code, headers, body = get(srv.url + "/healthz")
    assert code == 200
    assert headers["Content-Type"] == "application/json"
    b = json.loads(body)
    assert b == {
        "status": "healthy", "ebpf_loaded": True, "focus": "config_access", "ring_buffer_active": True,
        "events_processed": 42, "ring_buffer_drops": 0, "last_event_age_seconds": 1.5,
        "backend": "tracepoint", "watched_volumes": 3, "watched_pods": 2,
        "loop_heartbeat_age_seconds": 0.2, "store": "off",
    }


@pytest.mark.parametrize("change,reason", [
    ({"ebpf_loaded": False}, "eBPF programs are not loaded and attached"),
    ({"ring_buffer_active": False}, "ring buffer is not being polled"),
    ({"loop_heartbeat_age_seconds": 45.0}, "event loop stuck: last heartbeat 45.0s ago (limit 30s)"),
])
def test_healthz_unhealthy(server, change, reason):
    srv, _, current = server
    current["s"] = state(**change)
    code, _, body = get(srv.url + "/healthz")
    assert code == 503
    b = json.loads(body)
    assert b["status"] == "unhealthy"
    assert b["reason"] == reason
    assert b["focus"] == "config_access"


def test_healthz_state_fn_raises():
    m = Metrics()

    def broken():
        raise RuntimeError("reloading")

    with serve("127.0.0.1:0", m, broken) as srv:
        code, _, body = get(srv.url + "/healthz")
        assert code == 503
        assert "reloading" in json.loads(body)["reason"]
        assert scrape(srv.url)[("kernel_monitor_state_up", frozenset())] == 0


def test_unknown_path_404(server):
    srv, _, _ = server
    assert get(srv.url + "/nope")[0] == 404


def test_close_frees_port_and_busy_port_is_a_clear_error():
    m = Metrics()
    srv = serve("127.0.0.1:0", m, lambda: state())
    port = srv.port
    addr = f"127.0.0.1:{port}"
    try:
        with pytest.raises(ListenError, match=f"cannot listen on {addr}: Address already in use"):
            serve(addr, Metrics(), lambda: state())
    finally:
        srv.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{addr}/healthz", timeout=5)
    srv2 = serve(addr, m, lambda: state())   # the port is free again
    try:
        assert get(srv2.url + "/healthz")[0] == 200
    finally:
        srv2.close()


def test_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("requires IPv6")
    try:
        srv = serve("[::1]:0", Metrics(), lambda: state())
    except ListenError as e:
        pytest.skip(f"requires an IPv6 loopback address: {e}")
    with srv:
        assert srv.url.startswith("http://[::1]:")
        assert get(srv.url + "/healthz")[0] == 200


@pytest.mark.parametrize("bad", ["9717", "127.0.0.1:http", "127.0.0.1:70000", "example.com:80", ""])
def test_bad_listen_address(bad):
    with pytest.raises(ValueError, match="listen_address"):
        parse_listen_address(bad)


def test_listen_address_forms():
    assert parse_listen_address("127.0.0.1:9717") == ("127.0.0.1", 9717)
    assert parse_listen_address("[::1]:0") == ("::1", 0)
    assert parse_listen_address("localhost:9717") == ("localhost", 9717)


# --- a real Prometheus


def _find(tool):
    return shutil.which(tool) or (f"/usr/bin/{tool}" if os.access(f"/usr/bin/{tool}", os.X_OK) else None)


PROMETHEUS = _find("prometheus")
PROMTOOL = _find("promtool")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(PROMTOOL is None, reason="requires promtool (apt install prometheus)")
def test_promtool_lints_exposition(server):
    srv, m, _ = server
    m.access("secret_access", "prod", "db", count=3)
    m.processing("secret_access", 1e-5)
    m.correlation("pod_added")
    m.resync("periodic", 1)
    _, _, body = get(srv.url + "/metrics")
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="requires the prometheus server (apt install prometheus)")
def test_real_prometheus_scrape(server, tmp_path):
    srv, m, _ = server
    m.access("secret_access", "prod", "db-credentials", count=1234)
    web = f"127.0.0.1:{free_port()}"
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: tapio\n    static_configs: [{{targets: ['127.0.0.1:{srv.port}']}}]\n"
    )
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address={web}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),
    )
    try:
        q = urllib.parse.quote('kernel_monitor_secret_access_total{job="tapio",secret="db-credentials"}')
        result = None
        deadline = time.monotonic() + 90   # a bound for failure, not an assertion on speed
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                code, _, body = get(f"http://{web}/api/v1/query?query={q}")
            except (urllib.error.URLError, ConnectionError):
                code = None
            if code == 200:
                data = json.loads(body)["data"]["result"]
                if data:
                    result = data
                    break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert result, "Prometheus never stored a sample from /metrics"
        assert result[0]["metric"]["namespace"] == "prod"
        assert float(result[0]["value"][1]) == 1234
        code, _, body = get(f"http://{web}/api/v1/query?query=" + urllib.parse.quote('up{job="tapio"}'))
        assert json.loads(body)["data"]["result"][0]["value"][1] == "1"
    finally:
        terminate(proc, timeout=60)


def test_idle_connections_cannot_exhaust_the_listener(server):
    """200 idle connections (more than the unit's TasksMax would allow
    threads for): /healthz and /metrics still answer, at once."""
    from harness import metric_value

    srv, _, _ = server
    idle = []
    try:
        for _ in range(200):
            idle.append(socket.create_connection((srv.host, srv.port), timeout=5))
        t0 = time.monotonic()
        code, _, body = get(srv.url + "/healthz")
        assert code == 200 and json.loads(body)["status"] == "healthy"
        code, _, body = get(srv.url + "/metrics")
        assert code == 200
        assert time.monotonic() - t0 < 2.0
        assert threading.active_count() < 20
        # The oldest idle ones were closed to make room, and counted.
        text = body.decode()
        assert metric_value(text, "kernel_monitor_http_connections_refused_total", reason="too_many") >= 1
    finally:
        for s in idle:
            s.close()


def test_losses_are_exported_and_make_healthz_degraded(server):
    from harness import metric_value
    from tapio_node.metrics import LOSS_REASONS

    srv, _, current = server
    text = get(srv.url + "/metrics")[2].decode()
    for reason in LOSS_REASONS:
        assert f'kernel_monitor_events_lost_total{{reason="{reason}"}} 0.0' in text
    assert json.loads(get(srv.url + "/healthz")[2])["status"] == "healthy"
    current["s"] = state(events_lost={"fd_race": 3, "unresolved": 1}, losing=["fd_race"])
    code, _, body = get(srv.url + "/healthz")
    b = json.loads(body)
    assert code == 200 and b["status"] == "degraded"
    assert any("fd_race (3 in all)" in r for r in b["degraded"])
    text = get(srv.url + "/metrics")[2].decode()
    assert metric_value(text, "kernel_monitor_events_lost_total", reason="fd_race") == 3
    assert metric_value(text, "kernel_monitor_events_lost_total", reason="unresolved") == 1

"""Metrics: exact counts, the cardinality guard and the DaemonState collector,
read back through prometheus_client's own exposition writer and parser."""
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tapio_node import __version__
from tapio_node.metrics import OVERFLOW, DaemonState, Metrics


def scrape(m: Metrics) -> dict:
    """{(sample name, frozenset(labels)): value} from the text exposition."""
    text = generate_latest(m.registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def state(**kw):
    base = dict(ebpf_loaded=True, ring_buffer_active=True, events_processed=1234, ring_buffer_drops=5,
                watched_volumes=12, watched_files=40, watched_pods=4, last_event_age_seconds=0.5,
                loop_heartbeat_age_seconds=0.1, backend="tracepoint", status="watching 12 volumes")
    base.update(kw)
    return DaemonState(**base)


def test_exact_access_counts():
    m = Metrics()
    for _ in range(7):
        m.access("secret_access", "prod", "db-credentials")
    m.access("secret_access", "prod", "db-credentials", count=1000)
    m.access("configmap_access", "prod", "app-config", count=3)
    m.access("projected_access", "kube-system", "kube-api-access-abcde", count=2, cross_pod=True)
    s = scrape(m)
    assert val(s, "kernel_monitor_secret_access_total", namespace="prod", secret="db-credentials") == 1007
    assert val(s, "kernel_monitor_configmap_access_total", namespace="prod", configmap="app-config") == 3
    # Per-pod service-account volume names share one label.
    assert val(s, "kernel_monitor_projected_access_total", namespace="kube-system",
               volume="kube-api-access") == 2
    assert val(s, "kernel_monitor_cross_pod_access_total", namespace="kube-system", kind="projected") == 2
    assert val(s, "kernel_monitor_cross_pod_access_total", namespace="prod", kind="secret") is None
    assert not [n for n, _ in s if n.endswith("_created")]
    m.cross_pod("prod", "secret", 4)
    s = scrape(m)
    assert val(s, "kernel_monitor_cross_pod_access_total", namespace="prod", kind="secret") == 4


def test_other_counters_and_histogram():
    m = Metrics()
    m.correlation("pod_added", 3)
    m.correlation("cgroup_lookup_miss")
    m.resync("periodic", discrepancies=4)
    m.resync("inotify_overflow", discrepancies=0)
    m.processing("secret_access", 2e-6)
    m.processing("secret_access", 0.5)
    m.latency(0.003)
    s = scrape(m)
    assert val(s, "kernel_monitor_event_latency_seconds_count") == 1
    assert val(s, "kernel_monitor_event_latency_seconds_bucket", le="0.0025") == 0
    assert val(s, "kernel_monitor_event_latency_seconds_bucket", le="0.005") == 1
    assert val(s, "kernel_monitor_pod_correlation_total", operation="pod_added") == 3
    assert val(s, "kernel_monitor_pod_correlation_total", operation="cgroup_lookup_miss") == 1
    assert val(s, "kernel_monitor_resyncs_total", reason="periodic") == 1
    assert val(s, "kernel_monitor_resyncs_total", reason="inotify_overflow") == 1
    assert val(s, "kernel_monitor_resync_discrepancies_total") == 4
    h = "kernel_monitor_processing_duration_seconds"
    assert val(s, h + "_count", event_type="secret_access") == 2
    assert val(s, h + "_sum", event_type="secret_access") == pytest.approx(0.500002)
    assert val(s, h + "_bucket", event_type="secret_access", le="2.5e-06") == 1
    assert val(s, h + "_bucket", event_type="secret_access", le="1.0") == 2


def test_cardinality_guard():
    m = Metrics(max_series=5)
    for i in range(5):
        m.access("secret_access", "ns", f"s{i}")
    for i in range(5, 25):
        m.access("secret_access", "ns", f"s{i}", count=2)
    m.access("secret_access", "ns", "s7")       # refused before: not counted twice
    m.access("secret_access", "ns", "s0", count=10)  # known sets keep counting
    s = scrape(m)
    assert val(s, "kernel_monitor_secret_access_total", namespace="ns", secret="s0") == 11
    assert val(s, "kernel_monitor_secret_access_total", namespace=OVERFLOW, secret=OVERFLOW) == 41
    assert val(s, "kernel_monitor_secret_access_total", namespace="ns", secret="s5") is None
    assert val(s, "kernel_monitor_series_dropped_total") == 20
    # Exactness survives the guard: every access is somewhere.
    total = sum(v for (n, _), v in s.items() if n == "kernel_monitor_secret_access_total")
    assert total == 5 + 40 + 1 + 10


def test_state_collector_reads_at_scrape_time():
    m = Metrics()
    current = {"s": state()}
    m.register_state(lambda: current["s"])
    s = scrape(m)
    assert val(s, "kernel_monitor_ebpf_loaded") == 1
    assert val(s, "kernel_monitor_ring_buffer_active") == 1
    assert val(s, "kernel_monitor_events_processed_total") == 1234
    assert val(s, "kernel_monitor_ring_buffer_drops_total") == 5
    assert val(s, "kernel_monitor_watched_volumes") == 12
    assert val(s, "kernel_monitor_watched_files") == 40
    assert val(s, "kernel_monitor_watched_pods") == 4
    assert val(s, "kernel_monitor_last_event_age_seconds") == 0.5
    assert val(s, "kernel_monitor_loop_heartbeat_age_seconds") == pytest.approx(0.1)
    assert val(s, "kernel_monitor_build_info", version=__version__, backend="tracepoint") == 1
    assert val(s, "kernel_monitor_state_up") == 1
    current["s"] = state(ebpf_loaded=False, events_processed=2000, last_event_age_seconds=None)
    s = scrape(m)
    assert val(s, "kernel_monitor_ebpf_loaded") == 0
    assert val(s, "kernel_monitor_events_processed_total") == 2000
    assert ("kernel_monitor_last_event_age_seconds", frozenset()) not in s


def test_state_fn_failure_keeps_scrape_working():
    m = Metrics()
    m.access("secret_access", "a", "b")

    def broken():
        raise RuntimeError("mid-reload")

    m.register_state(broken)
    s = scrape(m)
    assert val(s, "kernel_monitor_state_up") == 0
    assert val(s, "kernel_monitor_secret_access_total", namespace="a", secret="b") == 1
    assert val(s, "kernel_monitor_build_info", version=__version__, backend="none") == 1


def test_no_pid_or_path_labels():
    m = Metrics()
    m.register_state(lambda: state())
    m.access("configmap_access", "x", "y")
    m.processing("configmap_access", 1e-5)
    labels = {k for (_, ls) in scrape(m) for k, _ in ls}
    assert labels <= {"namespace", "configmap", "secret", "volume", "kind", "operation", "event_type",
                      "reason", "le", "version", "backend"}


def test_bad_input():
    with pytest.raises(ValueError, match="unknown access event type"):
        Metrics().access("pod_syscall", "a", "b")
    with pytest.raises(ValueError, match="metrics_max_series"):
        Metrics(max_series=0)

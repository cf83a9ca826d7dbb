"""Pod specs through the whole pipeline: real BPF, a simulated node, pod
specs from a local HTTPS Kubernetes API (the node's client certificate)
or from static manifests."""
import os
import sys
import time

import pytest

from harness import daemon_factory, metric_value  # noqa: F401  (fixture)
from tapio_node.sim.node import SA_MOUNT, VolumeSpec

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "integration"))
from kube_api_server import KubeAPIServer, TestPKI, write_kubeconfig  # noqa: E402

pytestmark = pytest.mark.kernel


def _read_until(ctr, d, path, pred, timeout=15.0):
    """Read until the daemon reports the access the way pred wants (pod
    specs arrive asynchronously; events are never held back for them)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        s = ctr.start_reader(path).wait()
        got = d.wait_events(1, pred=lambda e: e["process"]["pid"] == s["pid"])
        if got:
            last = got[0]
            if pred(last):
                return last
        time.sleep(0.2)
    return last


def _web(node, **kw):
    return node.add_pod("shop", "web-7d4b9c-x2kqp", [
        VolumeSpec("secret", "certs", {"tls.key": b"K", "tls.crt": b"C"}, source_name="web-tls"),
        VolumeSpec("configmap", "app-config", {"app.yaml": b"a"}, source_name="web-settings"),
    ], **kw)


def test_names_from_the_api_with_the_node_client_certificate(sim_node, daemon_factory, tmp_path):
    pki = TestPKI(str(tmp_path / "pki"))
    srv = KubeAPIServer(pki, nodes={sim_node.node_name}).start()
    try:
        pod = _web(sim_node)
        ctr = pod.add_container("nginx")
        srv.put_pod(pod.manifest())
        kubeconfig = write_kubeconfig(str(tmp_path / "kubelet.conf"), srv.url, pki.ca,
                                      cert=pki.client("kubelet", sim_node.node_name))
        d = daemon_factory(sim_node.write_config(kubeconfig=kubeconfig, node_name=sim_node.node_name))
        by_spec = lambda e: e["config_name_source"] == "pod_spec"  # noqa: E731
        e = _read_until(ctr, d, "/run/secrets/certs/tls.key", by_spec)
        assert (e["config_name"], e["volume_name"], e["source_kind"], e["file"]) == \
            ("web-tls", "certs", "secret", "tls.key")
        e = _read_until(ctr, d, "/run/config/app-config/app.yaml", by_spec)
        assert (e["config_name"], e["volume_name"]) == ("web-settings", "app-config")
        token = _read_until(ctr, d, f"{SA_MOUNT}/token", by_spec)
        assert (token["source_kind"], token["config_name"]) == ("serviceAccountToken", "default")
        ca = _read_until(ctr, d, f"{SA_MOUNT}/ca.crt", by_spec)
        assert (ca["source_kind"], ca["config_name"], ca["event_type"]) == \
            ("configmap", "kube-root-ca.crt", "projected_access")
        text = d.get("/metrics")[1].decode()
        assert metric_value(text, "kernel_monitor_secret_access_total", namespace="shop",
                            secret="web-tls") >= 1
        assert metric_value(text, "kernel_monitor_configmap_access_total", namespace="shop",
                            configmap="kube-root-ca.crt") >= 1
        assert metric_value(text, "kernel_monitor_podspec_source_up") == 1
    finally:
        srv.stop()


def test_static_pod_names_without_any_api(sim_node, daemon_factory):
    pod = _web(sim_node, static=True)
    ctr = pod.add_container("nginx")
    d = daemon_factory(sim_node.write_config(node_name=sim_node.node_name))
    e = _read_until(ctr, d, "/run/secrets/certs/tls.key", lambda e: e["config_name_source"] == "pod_spec")
    assert (e["config_name"], e["pod_name"], e["namespace"]) == ("web-tls", pod.name, "shop")


def test_no_source_at_all_still_reports_volume_names(sim_node, daemon_factory, tmp_path):
    pod = _web(sim_node)
    ctr = pod.add_container("nginx")
    d = daemon_factory(sim_node.write_config(kubeconfig=str(tmp_path / "missing.conf"),
                                             node_name=sim_node.node_name))
    s = ctr.start_reader("/run/secrets/certs/tls.key").wait()
    (e,) = d.wait_events(1, pred=lambda e: e["process"]["pid"] == s["pid"])
    assert (e["config_name"], e["config_name_source"]) == ("certs", "volume_name")
    text = d.get("/metrics")[1].decode()
    assert metric_value(text, "kernel_monitor_podspec_source_up") == 0
    assert d.proc.poll() is None

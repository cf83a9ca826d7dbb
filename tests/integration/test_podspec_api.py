"""PodSpecs against a local HTTPS endpoint speaking the Kubernetes pods API.

Real TLS (throwaway CA from openssl), real client-certificate and bearer-token
authentication, real chunked watch streams; only the API server is a stand-in
(none can run here). Waits are bounded but nothing asserts a duration.
"""

import json
import logging
import os
import shutil
import threading
import time

import pytest

from kube_api_server import KubeAPIServer, TestPKI, free_port, write_kubeconfig
from tapio_node import podspec
from tapio_node.podspec import KeySource, PodSpecs

import prometheus_client

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures", "podspec")
NODE = "tapio-test-node"
WEB_UID = "3f6c2a1e-8b0d-4c6e-9a57-2f1d8e4b7c10"
ETCD_HASH = "5d2c6a8e0f1b4c3d9e7a6b5c4d3e2f10"


def fixture_pod(name: str) -> dict:
    with open(os.path.join(FIX, name)) as f:
        return json.load(f)


def new_pod(name: str, uid: str, *, node: str = NODE, secret: str = "s1") -> dict:
    pod = fixture_pod("pod_web.json")
    pod["metadata"].update(name=name, uid=uid, generateName=None)
    pod["spec"]["nodeName"] = node
    pod["spec"]["volumes"][0]["secret"]["secretName"] = secret
    return pod


def wait_until(pred, timeout: float = 15.0) -> bool:
    """Bounded wait for a condition (a safety net, not a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("requires the openssl CLI to make test certificates")
    return TestPKI(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="module")
def client_cert(pki):
    return pki.client("kubelet", NODE)


@pytest.fixture
def api(pki):
    servers = []

    def make(**kw):
        kw.setdefault("nodes", {NODE})
        srv = KubeAPIServer(pki, **kw)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture
def specs(tmp_path):
    made = []

    def make(**kw):
        kw.setdefault("static_pods_path", str(tmp_path / "no-manifests"))
        kw.setdefault("node_name", NODE)
        kw.setdefault("in_cluster", False)
        kw.setdefault("backoff_base", 0.02)
        kw.setdefault("backoff_cap", 0.2)
        kw.setdefault("static_interval", 0.05)
        kw.setdefault("tombstone_ttl", 0.0)
        s = PodSpecs(**kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def populated(srv: KubeAPIServer) -> KubeAPIServer:
    srv.put_pod(fixture_pod("pod_web.json"))
    srv.put_pod(fixture_pod("pod_etcd_mirror.json"))
    srv.put_pod(new_pod("elsewhere", "11111111-0000-0000-0000-000000000000", node="other-node"))
    return srv


@pytest.mark.parametrize("inline", [False, True], ids=["cert-files", "cert-data"])
def test_client_cert_list_then_watch(api, specs, pki, client_cert, tmp_path, inline):
    srv = populated(api()).start()
    kc = write_kubeconfig(str(tmp_path / "kubelet.conf"), srv.url, pki.ca, cert=client_cert, inline=inline)
    registry = prometheus_client.CollectorRegistry()
    states = []
    s = specs(kubeconfig=kc, metrics=registry, on_state=lambda up, text: states.append((up, text)))
    s.start()
    assert wait_until(lambda: s.up), s.last_error
    assert s.source == "api" and s.api_source == f"kubeconfig {kc}"
    assert states and states[-1][0] is True
    assert registry.get_sample_value("kernel_monitor_podspec_source_up") == 1

    web = s.get(WEB_UID)
    assert web is not None and (web.namespace, web.name) == ("shop", "web-7d9c5b8f6d-x2x9q")
    assert web.resolve("certs", "tls.crt") == KeySource("secret", "web-tls", "tls.crt")
    assert web.resolve("kube-api-access-7xk2p", "token") == KeySource("serviceAccountToken", "web-sa", None)
    assert web.resolve("kube-api-access-7xk2p", "ca.crt") == KeySource("configmap", "kube-root-ca.crt", "ca.crt")
    # The static pod's mirror is found by the kubelet's UID (the config hash) and by name.
    assert s.get(ETCD_HASH) is s.get_by_name("kube-system", f"etcd-{NODE}") is not None
    # Only this node's pods, asked for the way the kubelet asks.
    assert s.get("11111111-0000-0000-0000-000000000000") is None
    assert {r["params"].get("fieldSelector") for r in srv.requests} == {f"spec.nodeName={NODE}"}
    assert all(r["user"] == f"system:node:{NODE}" for r in srv.requests)

    # A pod created after start arrives through the watch.
    uid = "22222222-0000-0000-0000-000000000000"
    srv.put_pod(new_pod("late", uid, secret="late-secret"))
    late = s.wait_for(uid, timeout=15)
    assert late is not None and late.resolve("certs", "k") == KeySource("secret", "late-secret", "k")
    srv.put_pod(new_pod("late", uid, secret="rotated-secret"))
    assert wait_until(lambda: s.get(uid).resolve("certs", "k").name == "rotated-secret")
    srv.delete_pod("shop", "late")
    assert wait_until(lambda: s.get(uid) is None)
    assert srv.count(watch=False) == 1  # all of that without relisting
    assert registry.get_sample_value("kernel_monitor_podspec_pods", {"source": "api"}) == 2


def test_bearer_token_and_token_file_rotation(api, specs, pki, tmp_path):
    srv = populated(api(tokens={"token-one"})).start()
    token_file = tmp_path / "token"
    token_file.write_text("token-one\n")
    kc = write_kubeconfig(str(tmp_path / "kc"), srv.url, pki.ca, token_file=str(token_file), inline=True)
    s = specs(kubeconfig=kc)
    s.start()
    assert wait_until(lambda: s.up and srv.watching() == 1), s.last_error
    assert s.get(WEB_UID) is not None
    assert {r["user"] for r in srv.requests} == {"token"}

    # The token is rotated: the old one stops working, the file holds the new one.
    srv.tokens = {"token-two"}
    token_file.write_text("token-two\n")
    srv.drop_watches()
    uid = "33333333-0000-0000-0000-000000000000"
    srv.put_pod(new_pod("after-rotation", uid))
    assert s.wait_for(uid, timeout=15) is not None or wait_until(lambda: s.get(uid) is not None)
    assert any(r["user"] is None for r in srv.requests)  # the stale token was refused once


def test_static_token_kubeconfig(api, specs, pki, tmp_path):
    srv = populated(api(tokens={"static-token"})).start()
    kc = write_kubeconfig(str(tmp_path / "kc"), srv.url, pki.ca, token="static-token")
    s = specs(kubeconfig=kc)
    s.start()
    assert wait_until(lambda: s.up), s.last_error
    assert s.get(WEB_UID).service_account == "web-sa"


def test_410_gone_relists_and_drops_vanished_pods(api, specs, pki, client_cert, tmp_path):
    srv = populated(api()).start()
    kc = write_kubeconfig(str(tmp_path / "kc"), srv.url, pki.ca, cert=client_cert)
    s = specs(kubeconfig=kc)
    s.start()
    assert wait_until(lambda: s.up and srv.watching() == 1), s.last_error
    assert s.get(WEB_UID) is not None

    # The pod goes while we are not watching and its DELETED event is compacted away:
    # re-watching from our resourceVersion gets 410 Gone, and only a relist can tell.
    srv.remove_pod_silently("shop", "web-7d9c5b8f6d-x2x9q")
    srv.compact()
    srv.drop_watches()
    assert wait_until(lambda: s.get(WEB_UID) is None)
    lists = [r["params"] for r in srv.requests if not r["watch"]]
    assert len(lists) == 2
    assert lists[0].get("resourceVersion") == "0"  # first list: any cached state will do
    assert "resourceVersion" not in lists[1] and lists[1].get("limit")  # after 410: a consistent list
    assert s.up and s.get(ETCD_HASH) is not None


def test_410_on_an_open_watch_relists(api, specs, pki, client_cert, tmp_path):
    srv = populated(api()).start()
    kc = write_kubeconfig(str(tmp_path / "kc"), srv.url, pki.ca, cert=client_cert)
    s = specs(kubeconfig=kc)
    s.start()
    assert wait_until(lambda: s.up and srv.watching() == 1), s.last_error
    srv.compact(expire_running=True)
    assert wait_until(lambda: srv.count(watch=False) == 2)
    uid = "44444444-0000-0000-0000-000000000000"
    srv.put_pod(new_pod("after-gone", uid))
    assert wait_until(lambda: s.get(uid) is not None)


def test_dropped_connection_rewatches_from_last_version(api, specs, pki, client_cert, tmp_path):
    srv = populated(api()).start()
    kc = write_kubeconfig(str(tmp_path / "kc"), srv.url, pki.ca, cert=client_cert)
    s = specs(kubeconfig=kc)
    s.start()
    assert wait_until(lambda: s.up and srv.watching() == 1), s.last_error
    srv.bookmark()
    rv = srv.put_pod(new_pod("before-drop", "55555555-0000-0000-0000-000000000000"))
    assert wait_until(lambda: s.get("55555555-0000-0000-0000-000000000000") is not None)

    srv.drop_watches()
    assert wait_until(lambda: srv.count(watch=True) >= 2 and srv.watching() == 1)
    watches = [r["params"] for r in srv.requests if r["watch"]]
    assert watches[-1]["resourceVersion"] == str(rv)
    assert watches[-1]["allowWatchBookmarks"] == "true"
    assert srv.count(watch=False) == 1  # re-watched, not relisted
    assert s.up
    uid = "66666666-0000-0000-0000-000000000000"
    srv.put_pod(new_pod("after-drop", uid))
    assert wait_until(lambda: s.get(uid) is not None)


def test_api_down_at_start_then_up(api, specs, pki, client_cert, tmp_path, caplog):
    port = free_port()
    kc = write_kubeconfig(str(tmp_path / "kc"), f"https://127.0.0.1:{port}", pki.ca, cert=client_cert)
    states = []
    s = specs(kubeconfig=kc, on_state=lambda up, text: states.append((up, text)))
    with caplog.at_level(logging.INFO, logger="tapio_node.podspec"):
        s.start()
        assert wait_until(lambda: len(states) >= 3)  # several failed attempts, backing off
        assert not s.up and s.source == "none"
        assert all(up is False for up, _ in states) and "unreachable" in states[0][1]
        assert s.wait_for(WEB_UID, timeout=30) is None  # does not hold events while the API is down
        srv = populated(api(port=port)).start()
        assert wait_until(lambda: s.up), s.last_error
        assert s.get(WEB_UID) is not None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no Kubernetes API source" in warnings[0].getMessage()
    assert srv.count(watch=False) == 1


def test_no_credentials_at_all(specs, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    registry = prometheus_client.CollectorRegistry()
    states = []
    s = specs(
        kubeconfig=str(tmp_path / "absent.conf"),
        in_cluster=None,
        metrics=registry,
        on_state=lambda up, text: states.append((up, text)),
    )
    with caplog.at_level(logging.WARNING, logger="tapio_node.podspec"):
        s.start()
        assert wait_until(lambda: len(states) >= 2)
    assert not s.up and s.source == "none" and s.get(WEB_UID) is None
    assert "absent.conf is not readable" in states[0][1] and "KUBERNETES_SERVICE_HOST unset" in states[0][1]
    assert registry.get_sample_value("kernel_monitor_podspec_source_up") == 0
    assert registry.get_sample_value("kernel_monitor_podspec_errors_total", {"reason": "no_credentials"}) >= 2
    assert len(caplog.records) == 1
    s.stop()
    assert all(not t.is_alive() for t in threading.enumerate() if t.name.startswith("tapio-podspec"))

    res = podspec.check(static_pods_path=str(tmp_path / "none"), kubeconfig=str(tmp_path / "absent.conf"),
                        node_name=NODE)
    api_res = res[-1]
    assert api_res[0] is False and "no Kubernetes API credentials" in api_res[1] and "kubeconfig" in api_res[2]


def test_in_cluster_service_account(api, specs, pki, tmp_path, monkeypatch):
    srv = populated(api(tokens={"sa-token"})).start()
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("sa-token")
    (sa / "namespace").write_text("tapio-system")
    shutil.copy(pki.ca, sa / "ca.crt")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(srv.port))
    s = specs(kubeconfig=str(tmp_path / "absent.conf"), in_cluster=None, service_account_dir=str(sa))
    s.start()
    assert wait_until(lambda: s.up), s.last_error
    assert s.api_source.startswith("in-cluster service account")
    assert s.get(WEB_UID) is not None


def test_static_manifests_with_api(api, specs, pki, client_cert, tmp_path):
    manifests = tmp_path / "manifests"
    shutil.copytree(os.path.join(FIX, "manifests"), manifests)
    srv = populated(api()).start()
    kc = write_kubeconfig(str(tmp_path / "kc"), srv.url, pki.ca, cert=client_cert)
    s = specs(kubeconfig=kc, static_pods_path=str(manifests))
    s.start()
    assert wait_until(lambda: s.up and s.get_by_name("default", f"edge-proxy-{NODE}") is not None)
    assert s.source == "static+api"
    # The API's mirror pod is preferred over the manifest for the same pod.
    assert s.get_by_name("kube-system", f"etcd-{NODE}").source == "api"
    assert s.get_by_name("default", f"edge-proxy-{NODE}").source == "static"

    # Manifests are re-read when the directory changes.
    (manifests / "extra.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: extra, namespace: infra}\n")
    assert wait_until(lambda: s.get_by_name("infra", f"extra-{NODE}") is not None)
    os.unlink(manifests / "proxy.json")
    assert wait_until(lambda: s.get_by_name("default", f"edge-proxy-{NODE}") is None)


def test_static_only(specs, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    manifests = tmp_path / "manifests"
    shutil.copytree(os.path.join(FIX, "manifests"), manifests)
    s = specs(kubeconfig=str(tmp_path / "absent"), static_pods_path=str(manifests))
    s.start()
    assert wait_until(lambda: s.get_by_name("kube-system", f"etcd-{NODE}") is not None)
    assert wait_until(lambda: s.last_error is not None)
    assert s.source == "static" and not s.up


def test_stop_interrupts_a_blocked_watch(api, specs, pki, client_cert, tmp_path):
    srv = populated(api()).start()
    kc = write_kubeconfig(str(tmp_path / "kc"), srv.url, pki.ca, cert=client_cert)
    s = specs(kubeconfig=kc)
    s.start()
    assert wait_until(lambda: s.up and srv.watching() == 1), s.last_error
    threads = list(s._threads)
    s.stop(timeout=5.0)
    assert not any(t.is_alive() for t in threads)


def test_check_reports_source_and_node_access(api, pki, client_cert, tmp_path):
    srv = populated(api()).start()
    kc = write_kubeconfig(str(tmp_path / "kc"), srv.url, pki.ca, cert=client_cert)
    res = podspec.check(static_pods_path=os.path.join(FIX, "manifests"), kubeconfig=kc, node_name=NODE,
                        in_cluster=False)
    ok_static, text_static, _ = res[0]
    assert ok_static and "2 pod(s)" in text_static
    assert any(not ok and "broken.yaml" in text for ok, text, _ in res)
    ok, text, fix = res[-1]
    assert ok and f"kubeconfig {kc}" in text and "(2 now)" in text and fix == ""

    # The node's certificate only lets it read its own pods: a wrong node_name is a 403.
    res = podspec.check(static_pods_path=str(tmp_path / "none"), kubeconfig=kc, node_name="wrong-node",
                        in_cluster=False)
    ok, text, fix = res[-1]
    assert not ok and "403" in text and "node_name" in fix

    # A server nobody listens on.
    dead = write_kubeconfig(str(tmp_path / "dead"), f"https://127.0.0.1:{free_port()}", pki.ca, cert=client_cert)
    res = podspec.check(static_pods_path=str(tmp_path / "none"), kubeconfig=dead, node_name=NODE, in_cluster=False)
    ok, text, fix = res[-1]
    assert not ok and "unreachable" in text and "server address" in fix


def test_untrusted_server_certificate_is_refused(api, specs, pki, client_cert, tmp_path):
    srv = populated(api()).start()
    other = TestPKI(str(tmp_path / "other-ca"))
    kc = write_kubeconfig(str(tmp_path / "kc"), srv.url, other.ca, cert=client_cert)
    states = []
    s = specs(kubeconfig=kc, on_state=lambda up, text: states.append((up, text)))
    s.start()
    assert wait_until(lambda: len(states) >= 1)
    assert not s.up and "CERTIFICATE_VERIFY_FAILED" in states[0][1]


def test_vanished_token_file_does_not_kill_the_thread(api, specs, pki, tmp_path):
    srv = populated(api(tokens={"tok"})).start()
    token_file = tmp_path / "token"
    kc = write_kubeconfig(str(tmp_path / "kc"), srv.url, pki.ca, token_file=str(token_file))
    states = []
    s = specs(kubeconfig=kc, on_state=lambda up, text: states.append((up, text)))
    s.start()
    assert wait_until(lambda: len(states) >= 2)
    assert not s.up and "not found" in states[0][1]
    token_file.write_text("tok")
    assert wait_until(lambda: s.up), s.last_error
    assert s.get(WEB_UID) is not None


@pytest.mark.parametrize(
    "content, expect",
    [
        ("", "not a YAML mapping"),
        ("clusters: []\ncontexts: []\n", "No current context"),
        ("current-context: c\nclusters: []\ncontexts: [{name: c, context: {cluster: gone}}]\n", "KeyError"),
        ("clusters: [{name: a, cluster: {server: 5}}]\ncontexts: []\n", "ValidationError"),
    ],
)
def test_unusable_kubeconfig_is_named(tmp_path, monkeypatch, content, expect):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kc = tmp_path / "bad.conf"
    kc.write_text(content)
    with pytest.raises(podspec.SourceError) as err:
        podspec.api_config(kubeconfig=str(kc), in_cluster=None)
    assert f"kubeconfig {kc} is unusable" in str(err.value) and expect in str(err.value)
    assert err.value.reason == "no_credentials"


def test_from_config_with_the_daemons_config(api, pki, client_cert, tmp_path):
    from tapio_node import config

    srv = populated(api()).start()
    kc_path = write_kubeconfig(str(tmp_path / "kc"), srv.url, pki.ca, cert=client_cert)
    cfg_file = tmp_path / "tapio.yaml"
    cfg_file.write_text(
        f"kernel_collector:\n  kubeconfig: {kc_path}\n  node_name: {NODE}\n  static_pods_path: {tmp_path / 'm'}\n"
    )
    kc = config.load_config(str(cfg_file)).kernel_collector
    ok, text, _ = podspec.check_config(kc)[-1]
    assert ok and "(2 now)" in text
    s = podspec.from_config(kc, backoff_base=0.02, backoff_cap=0.2)
    try:
        s.start()
        assert wait_until(lambda: s.up), s.last_error
        assert s.get(WEB_UID) is not None
    finally:
        s.stop()


def test_paged_list_and_expired_continue_token(api, pki, client_cert, tmp_path):
    srv = populated(api()).start()
    for i in range(5):
        srv.put_pod(new_pod(f"p{i}", f"77777777-0000-0000-0000-00000000000{i}"))
    kc = write_kubeconfig(str(tmp_path / "kc"), srv.url, pki.ca, cert=client_cert)
    cfg, _ = podspec.api_config(kubeconfig=kc, in_cluster=False)
    client = podspec.api_client(cfg)
    try:
        pods, rv = podspec.list_pods(client, NODE, resource_version=None, limit=2)
        assert len(pods) == 7 and rv
        assert [r["params"].get("continue") for r in srv.requests] == [None, "2", "4", "6"]
        # A continue token that expired between pages: the list starts over, then fails clearly.
        srv.expire_continue = True
        with pytest.raises(podspec.SourceError, match="410"):
            podspec.list_pods(client, NODE, resource_version=None, limit=2)
        assert [r["params"].get("continue") for r in srv.requests[4:]] == [None, "2"] * 4
    finally:
        client.close()


def test_resource_version_from_the_future_falls_back_to_a_fresh_list(api, specs, pki, client_cert, tmp_path):
    srv = populated(api()).start()
    kc = write_kubeconfig(str(tmp_path / "kc"), srv.url, pki.ca, cert=client_cert)
    s = specs(kubeconfig=kc)
    s.start()
    assert wait_until(lambda: s.up and srv.watching() == 1), s.last_error
    srv.restore(50)  # etcd restored from a backup: our resourceVersion is now "too large"
    srv.drop_watches()
    assert wait_until(lambda: s.up and srv.watching() == 1 and srv.count(watch=False) >= 2)
    lists = [r["params"].get("resourceVersion") for r in srv.requests if not r["watch"]]
    assert lists[0] == "0" and lists[-1] == "0"
    uid = "88888888-0000-0000-0000-000000000000"
    srv.put_pod(new_pod("after-restore", uid))
    assert wait_until(lambda: s.get(uid) is not None)


def test_metrics_on_the_daemons_registry_survive_a_second_instance(specs, tmp_path, monkeypatch):
    from tapio_node import metrics

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    m = metrics.Metrics()
    # A SIGHUP reload builds a new PodSpecs on the same registry: no duplicate-series error.
    for _ in range(2):
        s = specs(kubeconfig=str(tmp_path / "absent"), metrics=m)
        s.start()
        assert wait_until(lambda: s.last_error is not None)
        s.stop()
    assert m.registry.get_sample_value("kernel_monitor_podspec_source_up") == 0
    assert m.registry.get_sample_value("kernel_monitor_podspec_errors_total", {"reason": "no_credentials"}) >= 2

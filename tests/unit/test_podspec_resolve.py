"""Pod spec -> object behind each volume key (tapio_node.podspec.model.PodMeta.resolve)."""

import json
import os
import shutil

import msgspec
import pytest

from tapio_node.podspec import static
from tapio_node.podspec.model import KeySource, Pod, PodMeta, list_decoder, pod_decoder, pod_meta

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures", "podspec")
NODE = "tapio-test-node"


def load(name: str) -> PodMeta:
    with open(os.path.join(FIX, name), "rb") as f:
        return pod_meta(pod_decoder.decode(f.read()))


@pytest.fixture(scope="module")
def web() -> PodMeta:
    return load("pod_web.json")


def test_pod_identity_and_workload(web):
    assert web.uid == "3f6c2a1e-8b0d-4c6e-9a57-2f1d8e4b7c10"
    assert (web.namespace, web.name) == ("shop", "web-7d9c5b8f6d-x2x9q")
    assert web.app_name == "web"
    assert web.service_account == "web-sa"
    # ReplicaSet web-7d9c5b8f6d with pod-template-hash 7d9c5b8f6d belongs to Deployment web.
    assert (web.workload_kind, web.workload_name) == ("Deployment", "web")
    assert web.labels["pod-template-hash"] == "7d9c5b8f6d"
    # Volumes that are not ConfigMap/Secret/projected/downwardAPI are not tracked.
    assert "cache" not in web.volumes


def test_secret_volume_named_differently_from_secret(web):
    assert web.resolve("certs", "tls.crt") == KeySource("secret", "web-tls", "tls.crt")
    # The atomic writer's hidden dirs hold the real files; the key is what follows them.
    assert web.resolve("certs", "..2026_11_25_10_00_00.123456789/tls.key") == KeySource("secret", "web-tls", "tls.key")
    assert web.resolve("certs", "..data/tls.key") == KeySource("secret", "web-tls", "tls.key")


def test_items_path_remapping(web):
    assert web.resolve("config", "conf/app.yaml") == KeySource("configmap", "web-config", "app.yaml")
    assert web.resolve("config", "LOG_LEVEL") == KeySource("configmap", "web-config", "log-level")
    # A path not in items[]: the object is known, the key is not.
    assert web.resolve("config", "other") == KeySource("configmap", "web-config", None)


def test_kube_api_access_keys_each_from_their_source(web):
    vol = "kube-api-access-7xk2p"
    assert web.resolve(vol, "token") == KeySource("serviceAccountToken", "web-sa", None)
    assert web.resolve(vol, "ca.crt") == KeySource("configmap", "kube-root-ca.crt", "ca.crt")
    assert web.resolve(vol, "namespace") == KeySource("downwardAPI", None, "metadata.namespace")
    assert web.resolve(vol, "unexpected") is None


def test_projected_all_keys_source_takes_unclaimed_keys(web):
    assert web.resolve("db", "db-host") == KeySource("configmap", "db-settings", "host")
    assert web.resolve("db", "password") == KeySource("secret", "db-creds", "password")


def test_downward_api_volume(web):
    assert web.resolve("podinfo", "labels") == KeySource("downwardAPI", None, "metadata.labels")
    assert web.resolve("podinfo", "cpu_limit") == KeySource("downwardAPI", None, "limits.cpu")


def test_unknown_volume(web):
    assert web.resolve("nope", "x") is None
    assert web.resolve("cache", "x") is None


def test_two_all_keys_sources_are_ambiguous():
    pod = msgspec.convert(
        {
            "metadata": {"name": "p", "namespace": "n", "uid": "u"},
            "spec": {
                "volumes": [
                    {
                        "name": "both",
                        "projected": {"sources": [{"secret": {"name": "a"}}, {"configMap": {"name": "b"}}]},
                    },
                ]
            },
        },
        Pod,
    )
    m = pod_meta(pod)
    # Which object holds key x is not in the spec: no guess.
    assert m.resolve("both", "x") is None


def test_bare_replicaset_and_statefulset_owners():
    def owner(kind, name, labels=None):
        pod = msgspec.convert(
            {
                "metadata": {
                    "name": "p",
                    "namespace": "n",
                    "uid": "u",
                    "labels": labels or {},
                    "ownerReferences": [{"kind": kind, "name": name, "controller": True}],
                }
            },
            Pod,
        )
        m = pod_meta(pod)
        return m.workload_kind, m.workload_name

    assert owner("ReplicaSet", "plain-rs") == ("ReplicaSet", "plain-rs")
    assert owner("ReplicaSet", "api-6b7f9", {"pod-template-hash": "other"}) == ("ReplicaSet", "api-6b7f9")
    assert owner("StatefulSet", "db") == ("StatefulSet", "db")
    assert owner("DaemonSet", "tapio-node") == ("DaemonSet", "tapio-node")


def test_mirror_pod_carries_kubelet_uid():
    m = load("pod_etcd_mirror.json")
    assert m.mirror_uid == "5d2c6a8e0f1b4c3d9e7a6b5c4d3e2f10"
    assert (m.workload_kind, m.workload_name) == ("Node", NODE)


def test_static_manifests_named_like_the_kubelet_does(tmp_path):
    d = tmp_path / "manifests"
    shutil.copytree(os.path.join(FIX, "manifests"), d)
    pods, errors = static.scan_manifests(str(d), "Tapio-Test-Node")
    by_name = {(p.namespace, p.name): p for p in pods}
    assert set(by_name) == {("kube-system", "etcd-tapio-test-node"), ("default", "edge-proxy-tapio-test-node")}
    etcd = by_name["kube-system", "etcd-tapio-test-node"]
    assert etcd.labels == {"component": "etcd", "tier": "control-plane"}
    assert (etcd.source, etcd.workload_kind, etcd.workload_name) == ("static", "Node", "Tapio-Test-Node")
    assert by_name["default", "edge-proxy-tapio-test-node"].app_name == "edge-proxy"
    # The invalid manifest is reported with its reason; the hidden one is skipped like the kubelet does.
    assert [(os.path.basename(p), "DNS-1123" in why) for p, why in errors] == [("broken.yaml", True)]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"kind: Deployment\nmetadata: {name: x}\n", "expected a Pod"),
        (b"kind: Pod\nmetadata: {name: x, labels: {a: [1]}}\n", "invalid Pod"),
        (b"kind: Pod\nmetadata: {name: x, namespace: Bad_NS}\n", "DNS-1123"),
        (b"{unclosed: [", "not YAML/JSON"),
    ],
)
def test_bad_manifest_says_why(tmp_path, content, message):
    p = tmp_path / "m.yaml"
    p.write_bytes(content)
    with pytest.raises(static.ManifestError, match=message):
        static.read_manifest(str(p), NODE)


def test_api_pod_list_shape_decodes():
    with open(os.path.join(FIX, "pod_web.json")) as f:
        pod = json.load(f)
    body = json.dumps(
        {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "42", "continue": "abc"},
         "items": [pod]}
    )
    lst = list_decoder.decode(body)
    assert (lst.metadata.resourceVersion, lst.metadata.continue_, len(lst.items)) == ("42", "abc", 1)

"""deploy/kubernetes/: what `kubectl apply -k` sends validates against the
Kubernetes API schemas (kubernetes-validate ships them: offline), and
says what issue 17 and the seed ask of the DaemonSet."""
from __future__ import annotations

import copy
import glob
import os
import re

import kubernetes_validate as kv  # make venv installs it
import pytest
import yaml

import deploy_manifests as dm
from tapio_node.config import parse_config, split_listen_address

# The oldest Kubernetes the manifests claim (securityContext.appArmorProfile)
# and the newest schema shipped.
VERSIONS = ["1.30.0", kv.latest_version()]
# Kinds of CRDs, not in the API schemas: checked by hand below.
CRD_KINDS = {"ServiceMonitor", "PodMonitor"}


@pytest.fixture(scope="module")
def docs():
    return dm.build()


def test_kustomization_lists_every_manifest():
    listed = dm.kustomization()["resources"]
    present = sorted(os.path.basename(p) for p in glob.glob(os.path.join(dm.KUBE_DIR, "*.yaml"))
                     if os.path.basename(p) != "kustomization.yaml")
    assert sorted(listed) == present


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate(docs, version):
    kinds = set()
    for d in docs:
        kinds.add(d["kind"])
        if d["kind"] in CRD_KINDS:
            continue
        kv.validate(d, version, strict=True)  # raises on any schema error or unknown field
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
            "DaemonSet", "Service"} <= kinds
    assert kinds & CRD_KINDS


@pytest.mark.parametrize("breakage", ["unknown field", "wrong type"])
def test_validation_catches_a_broken_daemonset(docs, breakage):
    ds = copy.deepcopy(dm.one(docs, "DaemonSet"))
    spec = ds["spec"]["template"]["spec"]
    if breakage == "unknown field":
        spec["hostPid"] = True
    else:
        spec["containers"][0]["securityContext"]["capabilities"]["add"] = "BPF"
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, VERSIONS[-1], strict=True)


def test_daemonset_security(docs):
    spec, c = dm.collector(docs)
    assert spec["hostPID"] is True
    assert not spec.get("hostNetwork")
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == ["BPF", "DAC_READ_SEARCH", "PERFMON", "SYS_RESOURCE"]
    assert sc["runAsUser"] == 0 and sc["readOnlyRootFilesystem"] is True


def test_daemonset_mounts(docs):
    spec, c = dm.collector(docs)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    host = {m["mountPath"]: volumes[m["name"]]["hostPath"]["path"]
            for m in c["volumeMounts"] if "hostPath" in volumes[m["name"]]}
    # The seed's mounts, and the ones issue 17 adds; each at the host's path.
    want_ro = ["/var/lib/kubelet/pods", "/var/log/pods", "/sys/fs/cgroup", "/sys/kernel/tracing",
               "/sys/kernel/debug"]
    for path in want_ro + ["/sys/fs/bpf"]:
        assert host.get(path) == path, path
    for path in want_ro:
        assert mounts[path].get("readOnly") is True, path
    assert not mounts["/sys/fs/bpf"].get("readOnly"), "pins are written to /sys/fs/bpf"
    assert mounts["/var/lib/kubelet/pods"]["mountPropagation"] == "HostToContainer"
    assert all(m.get("mountPropagation") in (None, "None", "HostToContainer") for m in mounts.values()), \
        "Bidirectional propagation needs a privileged container"
    cfg_vol = volumes[mounts["/etc/tapio-node"]["name"]]
    assert "configMap" in cfg_vol
    # The access store: on the host (readOnlyRootFilesystem), writable, where state_path says.
    cfg = parse_config(dm.config_text(docs), "ConfigMap tapio-node-config").kernel_collector
    assert host.get(cfg.state_path) == cfg.state_path and not mounts[cfg.state_path].get("readOnly")


def test_daemonset_runs_in_container_mode(docs):
    spec, c = dm.collector(docs)
    args = c["args"]
    assert args[:1] == ["run"] and args[args.index("--output") + 1] == "stdout"
    assert args[args.index("--config") + 1] == "/etc/tapio-node/config.yaml"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # The seed's requests and limits.
    assert c["resources"] == {"requests": {"memory": "64Mi", "cpu": "50m"},
                              "limits": {"memory": "256Mi", "cpu": "200m"}}


def test_probes_reach_the_configured_listener(docs):
    spec, c = dm.collector(docs)
    cfg = parse_config(dm.config_text(docs), "ConfigMap tapio-node-config").kernel_collector
    host, port = split_listen_address(cfg.listen_address)
    assert host == "0.0.0.0", "the kubelet probes the pod IP"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == port
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert ports.get(get["port"], get["port"]) == port
    # In-cluster config: no kubeconfig, the node name from the downward API.
    assert cfg.kubeconfig is None and cfg.node_name is None
    assert cfg.enforcement.mode == "off"


def test_rbac_grants_only_reading_pods(docs):
    spec, _ = dm.collector(docs)
    sa = dm.one(docs, "ServiceAccount", spec["serviceAccountName"])
    ds = dm.one(docs, "DaemonSet")
    assert sa["metadata"]["namespace"] == ds["metadata"]["namespace"]
    binding = dm.one(docs, "ClusterRoleBinding")
    assert {"kind": "ServiceAccount", "name": sa["metadata"]["name"],
            "namespace": sa["metadata"]["namespace"]} in binding["subjects"]
    role = dm.one(docs, "ClusterRole", binding["roleRef"]["name"])
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]


def test_metrics_service_and_monitor_select_the_pods(docs):
    ds = dm.one(docs, "DaemonSet")
    spec, c = dm.collector(docs)
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    svc = dm.one(docs, "Service")
    assert svc["metadata"]["namespace"] == ds["metadata"]["namespace"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in c["ports"]}
    mon = dm.one(docs, "ServiceMonitor")
    assert mon["apiVersion"] == "monitoring.coreos.com/v1"
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["metadata"]["namespace"] in mon["spec"]["namespaceSelector"]["matchNames"]
    assert [e["port"] for e in mon["spec"]["endpoints"]] == [port["name"]]
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"


def test_image_is_the_one_make_image_builds(docs, repo_root):
    _, c = dm.collector(docs)
    with open(os.path.join(repo_root, "pyproject.toml")) as f:
        version = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M).group(1)
    assert c["image"] == f"tapio-node:{version}"


def test_namespace_allows_the_daemonset(docs):
    ns = dm.one(docs, "Namespace")
    for d in docs:
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == ns["metadata"]["name"], d["kind"]
    # hostPID and hostPath are refused by the baseline and restricted levels.
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_kustomize_subset_refuses_unknown_keys(tmp_path, monkeypatch):
    k = tmp_path / "kustomization.yaml"
    k.write_text(yaml.safe_dump({"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                 "resources": [], "namePrefix": "x-"}))
    monkeypatch.setattr(dm, "KUSTOMIZATION", str(k))
    with pytest.raises(dm.KustomizeError, match="namePrefix"):
        dm.kustomization()

"""For `tapio-node check`: which pod-spec sources work, and what to do when one does not."""

from __future__ import annotations

import os
import socket

from tapio_node.config import KernelCollector, node_name_of
from tapio_node.podspec import api
from tapio_node.podspec.static import scan_manifests


CheckResult = tuple[bool, str, str]


def check(
    *,
    static_pods_path: str,
    kubeconfig: str | None,
    node_name: str,
    in_cluster: bool | None = None,
    service_account_dir: str = api.SERVICE_ACCOUNT_DIR,
    timeout: float = 5.0,
) -> list[CheckResult]:
    """For `tapio-node check`: which pod-spec sources work. Each item is (ok, text, fix)."""
    node = (node_name or socket.gethostname()).lower()
    out: list[CheckResult] = []
    if os.path.isdir(static_pods_path):
        try:
            pods, errors = scan_manifests(static_pods_path, node)
        except OSError as e:
            text = f"static pod manifests: cannot read {static_pods_path}: {e}"
            out.append((False, text, "check the directory's permissions"))
        else:
            out.append((True, f"static pod manifests: {len(pods)} pod(s) in {static_pods_path}", ""))
            for path, why in errors:
                fix = "fix or remove the file (the kubelet cannot run it either)"
                out.append((False, f"static pod manifest {path}: {why}", fix))
    else:
        out.append((True, f"static pod manifests: {static_pods_path} does not exist (no static pods)", ""))

    fix_creds = (
        f"set kernel_collector.kubeconfig to a kubeconfig allowed to list pods of node {node} "
        f"(kubeadm nodes: {api.DEFAULT_KUBECONFIG}), or run as a DaemonSet whose service account may list/watch pods"
    )
    try:
        cfg, desc = api.api_config(kubeconfig=kubeconfig, in_cluster=in_cluster, service_account_dir=service_account_dir)
    except api.SourceError as e:
        out.append((False, f"pod specs from the API: {e}; events will name volumes, not ConfigMaps/Secrets", fix_creds))
        return out
    client = None
    try:
        client = api.api_client(cfg, timeout=timeout)
        pods, _ = api.list_pods(client, node)
    except (api.SourceError, api.Gone) as e:
        reason = getattr(e, "reason", "")
        fix = {
            "http_401": "renew the client certificate or token in " + desc,
            "http_403": f"set kernel_collector.node_name to this node's name in the cluster (now {node!r}) "
            "or allow the service account to list/watch pods",
            "connect": f"check the server address in {desc} and that this host can reach it",
            "config": f"fix the certificate/key/CA files referenced by {desc}",
        }.get(reason, fix_creds)
        out.append((False, f"pod specs from the API via {desc}: {e}", fix))
    else:
        if pods:
            out.append((True, f"pod specs from the API via {desc}: can list pods of node {node} ({len(pods)} now)", ""))
        else:
            out.append(
                (
                    True,
                    f"pod specs from the API via {desc}: listing works but node {node} has no pods",
                    "if this node runs pods, set kernel_collector.node_name to its name in the cluster",
                )
            )
    finally:
        if client is not None:
            client.close()
    return out


def check_config(kc: KernelCollector, *, timeout: float = 5.0) -> list[CheckResult]:
    """check() for a config.KernelCollector."""
    return check(
        static_pods_path=kc.static_pods_path,
        kubeconfig=kc.kubeconfig or None,
        node_name=node_name_of(kc),
        timeout=timeout,
    )

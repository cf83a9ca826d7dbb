"""Static pods: the kubelet runs the Pod manifests it finds in ``static_pods_path``.

The kubelet names their pods ``<name>-<node>`` and gives them a
config-hash UID we cannot recompute, so they are also found by
namespace/name (:meth:`PodSpecs.get_by_name`).
"""

from __future__ import annotations

import os
import stat

import msgspec
import yaml

from tapio_node import k8snames
from tapio_node.podspec.model import OwnerRef, Pod, PodMeta, pod_meta

MAX_MANIFEST_BYTES = 1 << 20


class ManifestError(ValueError):
    pass


def read_manifest(path: str, node_name: str) -> PodMeta:
    """One static pod manifest (YAML or JSON Pod) as the kubelet names it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ManifestError(f"cannot open: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ManifestError("not a regular file")
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise ManifestError(f"not YAML/JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("kind") != "Pod":
        raise ManifestError("expected a Pod object (kind: Pod)")
    try:
        pod = msgspec.convert(doc, Pod)
    except msgspec.ValidationError as e:
        raise ManifestError(f"invalid Pod: {e}") from e
    base = pod.metadata.name
    if not k8snames.valid_pod_name(base):
        raise ManifestError(f"metadata.name {base!r} is not a DNS-1123 name")
    ns = pod.metadata.namespace or "default"
    if not k8snames.valid_namespace(ns):
        raise ManifestError(f"metadata.namespace {ns!r} is not a DNS-1123 label")
    # The kubelet names a static pod <name>-<node> (pkg/kubelet/config/common.go).
    pod.metadata.name = f"{base}-{node_name.lower()}"
    pod.metadata.namespace = ns
    pod.metadata.ownerReferences = [OwnerRef(kind="Node", name=node_name, controller=True)]
    return pod_meta(pod, source="static")


def scan_manifests(dirpath: str, node_name: str) -> tuple[list[PodMeta], list[tuple[str, str]]]:
    """All static pods in `dirpath` and the files that could not be read, with why."""
    pods, errors = [], []
    for entry in sorted(os.scandir(dirpath), key=lambda e: e.name):
        # The kubelet skips hidden files too.
        if entry.name.startswith(".") or not entry.is_file():
            continue
        try:
            pods.append(read_manifest(entry.path, node_name))
        except ManifestError as e:
            errors.append((entry.path, str(e)))
    return pods, errors


def dir_signature(dirpath: str) -> tuple | None:
    """What changes when a manifest in `dirpath` does (None: no such dir); cheap to poll."""
    try:
        entries = list(os.scandir(dirpath))
    except OSError:
        return None
    sig = []
    for e in entries:
        try:
            st = e.stat()
        except OSError:
            continue
        sig.append((e.name, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(sorted(sig))

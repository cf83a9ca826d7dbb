"""The kubelet's cgroup naming (systemd and cgroupfs drivers): what one
cgroup dir is (pod, container, QoS slice, ...) from its name and its
parent's."""

from __future__ import annotations

import re

import msgspec

from tapio_node.k8snames import valid_pod_uid

# cgroup dir names (matched on the part after the parent slice's prefix).
_SD_QOS_RE = re.compile(r"(burstable|besteffort)\.slice\Z")
_SD_POD_RE = re.compile(r"pod([0-9a-f_]{32,36})\.slice\Z")
_SD_CONTAINER_RE = re.compile(r"(cri-containerd|crio|docker)-([0-9a-f]{64})\.scope\Z")
_SD_CONMON_RE = re.compile(r"crio-conmon-[0-9a-f]{64}(?:\.scope)?\Z")
_FS_CONTAINER_RE = re.compile(r"(?:(cri-containerd|crio|docker)-)?([0-9a-f]{64})\Z")
_FS_POD_RE = re.compile(r"pod([0-9a-f-]{32,36})\Z")

# The kinds of cgroup whose processes belong to a pod.
POD_KINDS = frozenset(("pod", "container", "nested"))


class CgroupRef(msgspec.Struct, frozen=True):
    """What one cgroup dir is, from its name and its parent's.

    kind: "other" (above the kubepods tree), "kubepods", "qos", "pod",
    "container" (a container's own cgroup), "nested" (below a container).
    """

    kind: str
    driver: str | None = None      # "systemd" | "cgroupfs"
    stem: str = ""                 # systemd: the slice name without ".slice"
    qos: str | None = None
    pod_uid: str | None = None
    container_id: str | None = None
    runtime: str | None = None


OTHER = CgroupRef("other")


def _pod_uid(raw: str, systemd: bool) -> str | None:
    # systemd escapes '-' in unit names, so the slice carries the uid with '_'.
    uid = raw.replace("_", "-") if systemd else raw
    if systemd and "-" in raw:
        return None
    return uid if valid_pod_uid(uid) else None


def classify(parent: CgroupRef, name: str) -> CgroupRef | None:
    """The child dir `name` of a dir classified `parent`.

    Returns OTHER-like refs above the kubepods tree and None for a name
    that has no place inside it (odd or hostile: skipped by the caller).
    """
    kind = parent.kind
    if kind == "other":
        if name == "kubepods.slice":
            return CgroupRef("kubepods", "systemd", "kubepods")
        # --cgroup-root=/kubelet with the systemd driver: kubelet.slice/kubelet-kubepods.slice
        if parent.stem and name == parent.stem + "-kubepods.slice":
            return CgroupRef("kubepods", "systemd", name[:-len(".slice")])
        if name == "kubepods":
            return CgroupRef("kubepods", "cgroupfs")
        if name.endswith(".slice") and name != "-.slice":
            return CgroupRef("other", stem=name[:-len(".slice")])
        return OTHER
    if kind == "container" or kind == "nested":
        return CgroupRef("nested", parent.driver, "", parent.qos, parent.pod_uid,
                         parent.container_id, parent.runtime)
    if parent.driver == "systemd":
        prefix = parent.stem + "-"
        if kind == "pod":
            m = _SD_CONTAINER_RE.match(name)
            if m:
                return CgroupRef("container", "systemd", "", parent.qos, parent.pod_uid,
                                 m.group(2), m.group(1))
            return None
        if not name.startswith(prefix):
            return None
        rest = name[len(prefix):]
        if kind == "kubepods":
            m = _SD_QOS_RE.match(rest)
            if m:
                return CgroupRef("qos", "systemd", name[:-len(".slice")], m.group(1))
            qos = "guaranteed"
        else:  # qos
            qos = parent.qos
        m = _SD_POD_RE.match(rest)
        if m:
            uid = _pod_uid(m.group(1), True)
            if uid:
                return CgroupRef("pod", "systemd", name[:-len(".slice")], qos, uid)
        return None
    # cgroupfs
    if kind == "pod":
        m = _FS_CONTAINER_RE.match(name)
        if m:
            return CgroupRef("container", "cgroupfs", "", parent.qos, parent.pod_uid,
                             m.group(2), m.group(1))
        return None
    if kind == "kubepods" and name in ("burstable", "besteffort"):
        return CgroupRef("qos", "cgroupfs", "", name)
    m = _FS_POD_RE.match(name)
    if m:
        uid = _pod_uid(m.group(1), False)
        if uid:
            return CgroupRef("pod", "cgroupfs", "",
                             "guaranteed" if kind == "kubepods" else parent.qos, uid)
    return None


def known_non_pod(parent: CgroupRef, name: str) -> bool:
    """Known non-pod dirs inside the tree (the runtime's monitor): skipped
    without a log line."""
    return parent.kind == "pod" and _SD_CONMON_RE.match(name) is not None


def parse_cgroup_path(path: str) -> CgroupRef | None:
    """A cgroup v2 path (as in /proc/<pid>/cgroup, '/'-separated, relative
    to the mount) -> its pod/container ref, or None when it is not inside a
    pod cgroup (host processes) or does not parse."""
    ref = OTHER
    for name in path.split("/"):
        if not name:
            continue
        if name in (".", "..") or len(name) > 255:
            return None
        ref = classify(ref, name)
        if ref is None:
            return None
    return ref if ref.kind in POD_KINDS else None

"""What a cgroup belongs to (PodInfo, an entry of pod_info_map) and who
opened a file (Accessor), with the packing of PodInfo for the kernel."""

from __future__ import annotations

import msgspec

from tapio_node.kernel import wire
from tapio_node.k8snames import valid_container_id, valid_namespace, valid_pod_name, valid_pod_uid

QOS = {"guaranteed": 1, "burstable": 2, "besteffort": 3}
_QOS_NAME = {v: k for k, v in QOS.items()}

# struct tapio_pod_info (bpf/tapio.h): every name below fits its
# NUL-terminated field (uid 36 < 40, namespace 63 < 64, pod name 253 < 256,
# container id 64 < 72).


class PodInfo(msgspec.Struct, frozen=True):
    """One entry of pod_info_map (struct tapio_pod_info), validated."""

    pod_uid: str
    namespace: str | None
    pod_name: str | None
    container_id: str | None = None
    created_at: int = 0
    qos: str | None = None

    def __post_init__(self) -> None:
        if not valid_pod_uid(self.pod_uid):
            raise ValueError(f"PodInfo.pod_uid {self.pod_uid!r}: expected a lowercase UUID "
                             "(or the 32-hex uid of a static pod)")
        if self.namespace is not None and not valid_namespace(self.namespace):
            raise ValueError(f"PodInfo.namespace {self.namespace!r}: expected a DNS-1123 label "
                             "(lowercase alphanumerics and '-', at most 63 characters)")
        if self.pod_name is not None and not valid_pod_name(self.pod_name):
            raise ValueError(f"PodInfo.pod_name {self.pod_name!r}: expected a DNS-1123 subdomain "
                             "(lowercase alphanumerics, '-' and '.', at most 253 characters)")
        if self.container_id is not None and not valid_container_id(self.container_id):
            raise ValueError(f"PodInfo.container_id {self.container_id!r}: expected 64 lowercase "
                             "hex characters (without a runtime prefix such as 'containerd://')")
        if (not isinstance(self.created_at, int) or isinstance(self.created_at, bool)
                or not 0 <= self.created_at < 2**63):
            raise ValueError(f"PodInfo.created_at {self.created_at!r}: expected Unix seconds >= 0")
        if self.qos is not None and self.qos not in QOS:
            raise ValueError(f"PodInfo.qos {self.qos!r}: expected one of {sorted(QOS)} or None")


class Accessor(msgspec.Struct, frozen=True):
    """Who opened a file: what an event's `process` needs beyond pid/comm."""

    container_id: str | None
    pod_uid: str | None
    namespace: str | None
    pod_name: str | None
    role: str | None


HOST = Accessor(None, None, None, None, None)
KUBELET = Accessor(None, None, None, None, "kubelet")


def pack_pod_info(info: PodInfo) -> bytes:
    """struct tapio_pod_info as the kernel sees it (flags 0)."""
    return wire.pack_pod_info(info.pod_uid, info.namespace, info.pod_name, info.container_id,
                              info.created_at, QOS.get(info.qos or "", 0))


def unpack_pod_info(raw: bytes) -> PodInfo | None:
    """The inverse of pack_pod_info; None for anything that does not validate."""
    if len(raw) != wire.POD_INFO.size:
        return None
    uid, ns, name, cid, created, qos = wire.unpack_pod_info(raw)
    try:
        return PodInfo(uid, ns or None, name or None, cid or None, max(created, 0), _QOS_NAME.get(qos))
    except ValueError:
        return None

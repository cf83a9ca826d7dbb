"""The enforcement policy's user-space part: which pods allow_pods names,
and what it hands the kernel (tests/kernel/test_enforcement.py runs it)."""
import pytest

from tapio_node.config import Enforcement
from tapio_node.enforcement import Enforcer
from tapio_node.kernel import wire


class KernelPolicy:
    def __init__(self):
        self.mode, self.hosts, self.pods = "off", None, None

    def set_mode(self, mode):
        self.mode = mode

    def set_host_allow(self, names):
        self.hosts = set(names)

    def set_pod_allow(self, uids):
        self.pods = set(uids)


class Volumes:
    refreshed = 0

    def refresh_policy(self):
        self.refreshed += 1


class Pods:
    names = {"u1": ("monitoring", "vault-agent-0"), "u2": ("monitoring", "grafana-0"),
             "u3": ("prod", "vault-agent-1"), "u4": (None, None)}

    def pod_uids(self):
        return list(self.names)

    def pod_names(self, uid):
        return self.names[uid]


@pytest.mark.parametrize("patterns,allowed", [
    (["monitoring/vault-agent-*"], {"u1"}),
    (["*/vault-agent-*"], {"u1", "u3"}),
    (["monitoring/*"], {"u1", "u2"}),
    ([], set()),
])
def test_allow_pods_globs_name_namespace_and_pod(patterns, allowed):
    k, vols = KernelPolicy(), Volumes()
    e = Enforcer(k, vols)
    e.apply(Enforcement(mode="audit", allow_pods=patterns), ["kubelet.service"])
    e.refresh_pods(Pods())
    assert k.pods == allowed


def test_the_kubelet_is_allowed_even_when_not_listed_and_kinds_rewrite_the_volumes():
    k, vols = KernelPolicy(), Volumes()
    e = Enforcer(k, vols)
    e.apply(Enforcement(mode="enforce", allow_host_cgroups=["backup.service"]), ["kubelet.service"])
    assert (k.mode, k.hosts) == ("enforce", {"backup.service", "kubelet.service"})
    assert e.protects("secret") and not e.protects("configmap") and vols.refreshed == 1
    e.apply(Enforcement(mode="enforce", kinds=["configmap"]), ["kubelet.service"])
    assert e.protects("configmap") and not e.protects("secret") and vols.refreshed == 2
    e.apply(Enforcement(mode="audit", kinds=["configmap"]), ["kubelet.service"])
    assert vols.refreshed == 2   # same kinds: nothing to rewrite


def test_uids_reach_the_kernel_as_its_cgroup_walk_writes_them():
    # The systemd driver's slice name escapes '-' as '_'.
    assert wire.pack_uid("0b0c1d2e_0000_4000_8000_000000000001") == \
        wire.pack_uid("0b0c1d2e-0000-4000-8000-000000000001")
    assert len(wire.pack_uid("0b0c1d2e-0000-4000-8000-000000000001")) == wire.UID_LEN
    v = wire.volume_policy_value("0b0c1d2e-0000-4000-8000-000000000001", True)
    owner, flags = wire.VOLUME_POLICY.unpack(v)
    assert owner.rstrip(b"\0") == b"0b0c1d2e-0000-4000-8000-000000000001" and flags == wire.VOL_PROTECTED
    assert wire.host_allow_key("kubelet.service") == b"kubelet.service".ljust(wire.NAME_LEN, b"\0")

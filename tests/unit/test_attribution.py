"""A record group becomes one event: volume and key, opener, owner pod
names, pod-spec names; and the counters it moves."""
from types import SimpleNamespace

import msgspec
import pytest

from tapio_node import events as ev
from tapio_node.kernel import wire
from tapio_node.attribution import Attributor, count_access, overflow_record
from tapio_node.metrics import Metrics
from tapio_node.kernel.records import AccessRecord, SyscallRecord

OWNER = "0b0c1d2e-0000-4000-8000-000000000001"
OTHER = "0b0c1d2e-0000-4000-8000-000000000002"


def key_source(kind, name, key):
    return SimpleNamespace(kind=kind, name=name, key=key)


def pod_meta(resolve=None, **kw):
    """What the pod specs know of a pod (podspec.PodMeta's fields that count here)."""
    fields = dict(namespace="prod", name="web-0", app_name=None, service_account=None,
                  workload_kind=None, workload_name=None)
    fields.update(kw)
    return SimpleNamespace(resolve=lambda vname, key: resolve, **fields)


def volume(kind="secret", name="db", vid=7, **kw):
    return SimpleNamespace(id=vid, pod_uid=OWNER, kind=kind, name=name, namespace=None,
                           config_name=None, path=f"/var/lib/kubelet/pods/{OWNER}/volumes/x/{name}",
                           **kw)


class Volumes:
    def __init__(self, vol, key="password"):
        self.vol, self.key, self.asked = vol, key, []

    def resolve(self, volume_id, file_id, dnames):
        self.asked.append((volume_id, file_id, dnames))
        return (self.vol, self.key) if self.vol is not None else None


class Pods:
    def __init__(self, accessor_uid=OWNER, role=None, names=("prod", "web-0")):
        self.acc = SimpleNamespace(container_id="c0ffee", pod_uid=accessor_uid, role=role,
                                   namespace="prod" if accessor_uid == OWNER else "dev",
                                   pod_name="web-0" if accessor_uid == OWNER else "snoop")
        self.names = names

    def accessor(self, cgroup_id, pid, comm):
        return self.acc

    def pod_names(self, pod_uid):
        return self.names


class Specs:
    def __init__(self, meta, by_name=False):
        self.meta, self.by_name = meta, by_name

    def get(self, uid):
        return None if self.by_name else self.meta

    def get_by_name(self, namespace, name):
        return self.meta if self.by_name else None


class Clock:
    def rfc3339(self, ns):
        return f"T{ns}"


def access(**kw):
    fields = dict(pid=42, tid=43, cgroup_id=9, comm="cat", dev=1, gen=2, ino=3, volume_id=7,
                  file_id=5, flags=0, op=0, path="/etc/db/password", dnames=None, count=3,
                  first_ts=100, last_ts=200, stamps=[100, 150, 200])
    fields.update(kw)
    return AccessRecord(**fields)


def test_a_group_becomes_one_access_event():
    vols = Volumes(volume())
    event, vol = Attributor(vols, Clock()).access(access(flags=wire.F_UNLINKED, op=2))
    assert vols.asked == [(7, 5, None)]
    assert vol is vols.vol
    assert msgspec.to_builtins(event) == {
        "event_type": "secret_access", "timestamp": "T100", "pod_uid": OWNER, "namespace": None,
        "pod_name": None, "config_name": "db", "config_name_source": "volume_name",
        "volume_name": "db", "mount_path": vol.path, "file": "password",
        "path": "/etc/db/password",
        "process": {"pid": 42, "command": "cat", "cgroup_id": 9, "tid": 43, "container_id": None,
                    "pod_uid": None, "namespace": None, "pod_name": None, "role": None},
        "cross_pod": None, "source_kind": None, "source_key": None, "service_account": None,
        "workload": None, "app": None, "syscall": "openat2", "stale_inode": True,
        "path_truncated": False, "file_truncated": False, "overflow": False, "policy": None}
    assert type(event) is ev.AccessEvent


def test_a_gone_volume_gives_none():
    assert Attributor(Volumes(None), Clock()).access(access()) is None


@pytest.mark.parametrize("uid,role,cross", [(OWNER, None, False), (OTHER, None, True),
                                            (None, "kubelet", False), (None, None, True)])
def test_opener_and_owner_from_the_pod_registry(uid, role, cross):
    a = Attributor(Volumes(volume()), Clock(), pods=Pods(accessor_uid=uid, role=role))
    event, _ = a.access(access())
    assert (event.namespace, event.pod_name) == ("prod", "web-0")
    assert event.cross_pod is cross
    assert (event.process.pod_uid, event.process.container_id, event.process.role) == \
        (uid, "c0ffee", role)


@pytest.mark.parametrize("by_name", [False, True], ids=["by-uid", "static-pod-by-name"])
def test_pod_spec_names_are_in_the_event_from_the_start(by_name):
    meta = pod_meta(key_source("secret", "db-credentials", "pw"), app_name="web",
                    service_account="web-sa", workload_kind="Deployment", workload_name="web")
    specs = Specs(meta, by_name=by_name)
    a = Attributor(Volumes(volume()), Clock(), pods=Pods(names=("prod", "web-0")), podspecs=specs)
    event, _ = a.access(access())
    assert (event.config_name, event.config_name_source) == ("db-credentials", "pod_spec")
    assert (event.source_kind, event.source_key) == ("secret", "pw")
    assert (event.service_account, event.app, event.workload) == \
        ("web-sa", "web", ev.Workload("Deployment", "web"))


def test_pod_spec_fills_names_the_registry_lacks():
    a = Attributor(Volumes(volume()), Clock(), podspecs=Specs(pod_meta()))
    event, _ = a.access(access())
    assert (event.namespace, event.pod_name, event.config_name_source) == \
        ("prod", "web-0", "volume_name")


def test_overflow_counts_make_one_event_with_the_count():
    rec = overflow_record(9, 1, 7, 5, 1, 40, now_ns=500)
    assert (rec.count, rec.first_ts, rec.last_ts, rec.path, rec.stamps) == (40, 500, 500, "", None)
    event, _ = Attributor(Volumes(volume()), Clock()).access(rec, overflow=True)
    assert type(event) is ev.OverflowAccessEvent
    assert (event.overflow, event.count, event.timestamp, event.syscall) == (True, 40, "T500", "open")


def test_syscall_group_event():
    rec = SyscallRecord(pid=3, tid=4, cgroup_id=9, comm="app", nr=39, count=2, first_ts=7,
                        last_ts=8)
    event = Attributor(Volumes(None), Clock(), pods=Pods()).syscall(rec)
    assert (event.event_type, event.timestamp, event.syscall_nr, event.count) == \
        ("pod_syscall", "T7", 39, 2)
    assert (event.pod_uid, event.namespace, event.pod_name) == (OWNER, "prod", "web-0")


def _samples(m):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in m.registry.collect() for s in fam.samples if s.name.endswith("_total")}


def test_count_access_moves_the_kinds_counter_and_cross_pod():
    m = Metrics()
    vol = volume()
    event, _ = Attributor(Volumes(vol), Clock(), pods=Pods(accessor_uid=OTHER)).access(access())
    count_access(m, event, vol, 3)
    s = _samples(m)
    assert s[("kernel_monitor_secret_access_total", (("namespace", "prod"), ("secret", "db")))] == 3
    assert s[("kernel_monitor_cross_pod_access_total", (("kind", "secret"), ("namespace", "prod")))] == 3


def test_a_projected_key_from_a_secret_also_counts_for_the_secret():
    m = Metrics()
    vol = volume(kind="projected", name="bundle")
    meta = pod_meta(key_source("secret", "db-credentials", "pw"))
    event, _ = Attributor(Volumes(vol), Clock(), podspecs=Specs(meta)).access(access())
    count_access(m, event, vol, 2)
    s = _samples(m)
    assert s[("kernel_monitor_projected_access_total", (("namespace", "prod"), ("volume", "bundle")))] == 2
    assert s[("kernel_monitor_secret_access_total",
              (("namespace", "prod"), ("secret", "db-credentials")))] == 2


def test_a_downward_api_key_the_spec_resolved_says_pod_spec():
    meta = pod_meta(key_source("downwardAPI", None, "metadata.namespace"))
    vol = volume(kind="projected", name="kube-api-access-abcde")
    event, _ = Attributor(Volumes(vol, key="namespace"), Clock(), podspecs=Specs(meta)).access(access())
    assert (event.config_name, event.config_name_source, event.source_kind) == \
        ("kube-api-access-abcde", "pod_spec", "downwardAPI")


@pytest.mark.parametrize("flag,policy,action", [
    (0, None, None), (wire.F_POLICY_ALLOWED, "allowed", None),
    (wire.F_POLICY_WOULD_DENY, "would_deny", "audit"), (wire.F_POLICY_DENIED, "denied", "deny")])
def test_the_kernel_verdict_becomes_the_policy_field_and_its_counter(flag, policy, action):
    from tapio_node.attribution import count_access
    from tapio_node.metrics import Metrics

    vols = Volumes(volume())
    event, vol = Attributor(vols, Clock()).access(access(flags=flag | wire.F_UNLINKED))
    assert event.policy == policy
    m = Metrics()
    count_access(m, event, vol, 3)
    got = {s.labels["action"]: s.value for f in m.registry.collect()
           if f.name == "kernel_monitor_policy_violations" for s in f.samples
           if s.name.endswith("_total")}
    assert got == ({action: 3.0} if action else {})


def test_an_overflow_group_keeps_its_verdict():
    from tapio_node.attribution import overflow_record

    op = wire.OP_OPENAT2 | wire.F_POLICY_DENIED << 2
    rec = overflow_record(9, 42, 7, 5, op, 4, 100)
    assert (rec.op, rec.flags) == (wire.OP_OPENAT2, wire.F_POLICY_DENIED)

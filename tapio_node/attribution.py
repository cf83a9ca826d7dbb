"""From a folded record group to the event that reports it: which file of
which volume of which pod, opened by which process of which pod, named as
the pod spec names it when that is known.

The input is a record of tapio_node.kernel.records (what the ring-buffer reader
hands out, or one made from the kernel's overflow counts); the event is
built once, with everything it says."""
from __future__ import annotations

from tapio_node import events as ev, host
from tapio_node.kernel import wire
from tapio_node.kernel.records import AccessRecord


def overflow_record(cgroup_id: int, pid: int, volume_id: int, file_id: int, op: int,
                    count: int, now_ns: int) -> AccessRecord:
    """A group the kernel only counted (the ring buffer was full): no path,
    no per-access time, the command as /proc says it now. op is the
    overflow key's: the opener's syscall and the policy verdict."""
    op, flags = wire.split_overflow_op(op)
    return AccessRecord(pid=pid, tid=pid, cgroup_id=cgroup_id, comm=host.proc_comm(pid), dev=0, gen=0,
                        ino=0, volume_id=volume_id, file_id=file_id, flags=flags, op=op, path="",
                        dnames=None, count=count, first_ts=now_ns, last_ts=now_ns, stamps=None)


class Attributor:
    """volumes: the VolumeIndex (volume and key of a watch entry); pods:
    the PodRegistry (who the opener is, the owner pod's names), or None;
    podspecs: the pod specs (what the spec calls the file), or None."""

    def __init__(self, volumes, clock: ev.Clock, pods=None, podspecs=None):
        self.volumes = volumes
        self.clock = clock
        self.pods = pods
        self.podspecs = podspecs

    def process(self, pid: int, tid: int, cgroup_id: int, comm: str) -> ev.ProcessInfo:
        """The opener: pid and command, and its pod and container when known."""
        proc = ev.ProcessInfo(pid=pid, command=comm, cgroup_id=cgroup_id, tid=tid)
        if self.pods is not None:
            acc = self.pods.accessor(cgroup_id, pid, comm)
            proc.container_id, proc.pod_uid = acc.container_id, acc.pod_uid
            proc.namespace, proc.pod_name, proc.role = acc.namespace, acc.pod_name, acc.role
        return proc

    def access(self, rec, overflow: bool = False):
        """(event, volume) for an access group, or None when its volume is
        gone (removed before the record was read)."""
        resolved = self.volumes.resolve(rec.volume_id, rec.file_id, rec.dnames)
        if resolved is None:
            return None
        vol, key = resolved
        proc = self.process(rec.pid, rec.tid, rec.cgroup_id, rec.comm)
        namespace, pod_name, cross_pod = vol.namespace, None, None
        if self.pods is not None:
            ns2, pod_name = self.pods.pod_names(vol.pod_uid)
            namespace = ns2 or namespace
            cross_pod = proc.role != "kubelet" and proc.pod_uid != vol.pod_uid
        config_name = vol.config_name or vol.name
        config_name_source = "collector" if vol.config_name else "volume_name"
        service_account = app = workload = source_kind = source_key = None
        meta = None
        if self.podspecs is not None:
            meta = self.podspecs.get(vol.pod_uid)
            if meta is None and namespace and pod_name:
                # Static pods: the kubelet's UID is a config hash, not the
                # manifest's; match them by namespace/name.
                meta = self.podspecs.get_by_name(namespace, pod_name)
        if meta is not None:
            namespace = namespace or meta.namespace
            pod_name = pod_name or meta.name
            service_account, app = meta.service_account, meta.app_name
            if meta.workload_kind and meta.workload_name:
                workload = ev.Workload(meta.workload_kind, meta.workload_name)
            src = meta.resolve(vol.name, key)
            if src is not None:
                # Resolved by the spec, downward-API keys (no object name) included.
                config_name, config_name_source = src.name or config_name, "pod_spec"
                source_kind, source_key = src.kind, src.key
        flags, op = rec.flags, rec.op
        make = ev.OverflowAccessEvent if overflow else ev.AccessEvent
        extra = {"overflow": True, "count": rec.count} if overflow else {}
        event = make(
            event_type=ev.BY_VOLUME_KIND[vol.kind].event_type,
            timestamp=self.clock.rfc3339(rec.first_ts), pod_uid=vol.pod_uid,
            namespace=namespace, pod_name=pod_name, config_name=config_name,
            config_name_source=config_name_source, volume_name=vol.name, mount_path=vol.path,
            file=key, path=rec.path, process=proc, cross_pod=cross_pod,
            source_kind=source_kind, source_key=source_key, service_account=service_account,
            workload=workload, app=app, syscall=wire.OP_NAMES.get(op, str(op)),
            stale_inode=bool(flags & wire.F_UNLINKED),
            path_truncated=bool(flags & wire.F_PATH_TRUNC),
            file_truncated=bool(flags & wire.F_DNAME_TRUNC),
            policy=wire.POLICY_NAMES.get(flags & wire.F_POLICY_MASK), **extra)
        return event, vol

    def syscall(self, rec) -> ev.PodSyscallEvent:
        """The event for a group of sampled syscalls of one pod process."""
        proc = self.process(rec.pid, rec.tid, rec.cgroup_id, rec.comm)
        return ev.PodSyscallEvent(
            event_type=ev.POD_SYSCALL, timestamp=self.clock.rfc3339(rec.first_ts),
            pod_uid=proc.pod_uid, namespace=proc.namespace, pod_name=proc.pod_name,
            syscall_nr=rec.nr, count=rec.count, process=proc)


def count_access(metrics, event: ev.AccessEvent, vol, count: int) -> None:
    """The counters one attributed access group moves."""
    kind = ev.BY_VOLUME_KIND[vol.kind]
    if kind is ev.PROJECTED:
        metrics.access(kind.event_type, event.namespace, vol.name, count, volume_id=vol.id)
        # A projected key from a ConfigMap/Secret also counts for that
        # object, so "which secrets are never read" sees every mount.
        also = ev.BY_VOLUME_KIND.get(event.source_kind or "")
        if also is not None and also is not ev.PROJECTED and event.config_name_source == "pod_spec":
            metrics.access(also.event_type, event.namespace, event.config_name, count,
                           volume_id=vol.id)
    else:
        metrics.access(kind.event_type, event.namespace, event.config_name, count,
                       volume_id=vol.id)
    if event.cross_pod:
        metrics.cross_pod(event.namespace, vol.kind, count)
    if event.policy in ev.VIOLATIONS:
        metrics.policy_violation(event.namespace, vol.kind, event.config_name,
                                 "deny" if event.policy == "denied" else "audit", count)

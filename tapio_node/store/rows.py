"""What one access and one mounted file become in the store: the row keys
(schema.ACCESS_KEY, schema.MOUNT_KEY + MOUNT_NAMES), built from the event
the daemon already made and from the volume index."""
from __future__ import annotations

from tapio_node import host

# An accessor's kind in the store and the report: a contract.
POD, HOST, KUBELET = "pod", "host", "kubelet"
# The automounted service-account volume: the least-privilege section
# covers it (automountServiceAccountToken), dead-config does not.
SA_VOLUME_PREFIX = "kube-api-access-"
# Host cgroups remembered per cgroup id (bounded: ids of gone cgroups pile up).
MAX_HOST_CGROUPS = 4096
# A pod chooses its processes' names: past this many distinct commands per
# container (or host cgroup) they share one row, so it cannot grow the store
# without bound by exec'ing random names.
MAX_COMMANDS = 64
OTHER_COMMANDS = "(other commands)"
MAX_ACCESSORS = 65536


def workload_name(kind: str | None, name: str | None, pod_name: str | None) -> str:
    """"Kind/name" of the pod's controller, "Pod/<name>" for a bare pod, '' unknown.
    A static pod's owner is its Node: each static pod is its own workload."""
    if kind and name and kind != "Node":
        return f"{kind}/{name}"
    return f"Pod/{pod_name}" if pod_name else ""


def workload_of(meta, pod_name: str | None) -> str:
    if meta is None:
        return workload_name(None, None, pod_name)
    return workload_name(meta.workload_kind, meta.workload_name, pod_name)


def object_kind(vol_kind: str, source_kind: str | None) -> str:
    """The object behind a file: the pod spec's source kind when known
    (configmap, secret, serviceAccountToken, downwardAPI ...), else the volume's kind."""
    return source_kind or vol_kind


class RowKeys:
    """Builds access keys; podspecs: the daemon's pod specs (or None)."""

    def __init__(self, podspecs=None):
        self.podspecs = podspecs
        self._host_cgroups: dict[int, str] = {}
        self._commands: dict[str, set[str]] = {}
        self.commands_folded = 0   # accesses recorded under OTHER_COMMANDS

    def command(self, accessor: str, command: str) -> str:
        seen = self._commands.get(accessor)
        if seen is None:
            if len(self._commands) >= MAX_ACCESSORS:
                self._commands.clear()
            seen = self._commands[accessor] = set()
        if command in seen:
            return command
        if len(seen) < MAX_COMMANDS:
            seen.add(command)
            return command
        self.commands_folded += 1
        return OTHER_COMMANDS

    def host_cgroup(self, cgroup_id: int, pid: int) -> str:
        path = self._host_cgroups.get(cgroup_id)
        if path is None:
            try:
                path = host.cgroup_v2_path(host.proc_cgroup(pid)) or ""
            except OSError:
                path = ""  # gone already: not cached, the next access may tell
                return path
            if len(self._host_cgroups) >= MAX_HOST_CGROUPS:
                self._host_cgroups.clear()
            self._host_cgroups[cgroup_id] = path
        return path

    def _meta(self, uid: str | None):
        return self.podspecs.get(uid) if self.podspecs is not None and uid else None

    def access(self, event, vol) -> tuple:
        """The access key of an attributed event (schema.ACCESS_KEY order)."""
        w = event.workload
        owner_workload = workload_name(w.kind if w else None, w.name if w else None, event.pod_name)
        proc = event.process
        cgroup = ""
        if proc.role == "kubelet":
            kind, acc_ns, acc_workload, acc_pod = KUBELET, "", "kubelet", ""
        elif proc.pod_uid:
            kind, acc_ns, acc_pod = POD, proc.namespace or "", proc.pod_name or ""
            acc_workload = (owner_workload if proc.pod_uid == vol.pod_uid
                            else workload_of(self._meta(proc.pod_uid), proc.pod_name))
        else:
            cgroup = self.host_cgroup(proc.cgroup_id, proc.pid)
            kind, acc_ns, acc_pod = HOST, "", ""
            # A host program is known by its unit (its cgroup), else by its name.
            acc_workload = cgroup or proc.command
        container = proc.container_id or ""
        command = proc.command
        seen = self._commands.get(container or cgroup or acc_workload)
        if seen is None or command not in seen:   # the rare case, out of line
            command = self.command(container or cgroup or acc_workload, command)
        return (event.namespace or "", event.pod_name or "", vol.pod_uid, owner_workload,
                vol.kind, object_kind(vol.kind, event.source_kind), event.config_name,
                vol.name, event.file, kind, acc_ns, acc_workload, acc_pod,
                container, cgroup, command)


class MountInventory:
    """Every watched file as a mount row (MOUNT_KEY + MOUNT_NAMES order),
    named as events name them (pod spec first, then the volume). A volume's
    rows are rebuilt only when its files or its pod's names or spec
    changed: a node has up to max_watched_files of them, and this runs in
    the event loop."""

    def __init__(self):
        self._cache: dict[int, tuple[tuple, list[tuple]]] = {}

    def rows(self, volumes, pods=None, podspecs=None) -> list[tuple]:
        names: dict[str, tuple] = {}
        out: list[tuple] = []
        cache, fresh = self._cache, {}
        for vol in list(volumes.volumes.values()):
            got = names.get(vol.pod_uid)
            if got is None:
                got = names[vol.pod_uid] = _pod_names(vol, pods, podspecs)
            fids = vol.files.values()
            # File ids only grow: a changed file set changes the count or the largest id.
            mark = (len(fids), max(fids, default=0), got)
            hit = cache.get(vol.id)
            if hit is None or hit[0] != mark:
                hit = (mark, _volume_rows(vol, volumes.files, got))
            fresh[vol.id] = hit
            out.extend(hit[1])
        self._cache = fresh
        return out


def _pod_names(vol, pods, podspecs) -> tuple:
    ns = pod = None
    if pods is not None:
        ns, pod = pods.pod_names(vol.pod_uid)
    meta = podspecs.get(vol.pod_uid) if podspecs is not None else None
    if meta is None and podspecs is not None and ns and pod:
        meta = podspecs.get_by_name(ns, pod)
    if meta is not None:
        ns, pod = ns or meta.namespace, pod or meta.name
    return (ns or vol.namespace or "", pod or "", workload_of(meta, pod), meta)


def _volume_rows(vol, files, names: tuple) -> list[tuple]:
    ns, pod, workload, meta = names
    rows = []
    for fid in list(vol.files.values()):
        wf = files.get(fid)
        if wf is None:
            continue
        kind, name = vol.kind, vol.config_name or vol.name
        if meta is not None:
            src = meta.resolve(vol.name, wf.key)
            if src is not None:
                kind, name = src.kind, src.name or name
        rows.append((vol.pod_uid, vol.name, wf.key, kind, name, ns, pod, workload, vol.kind))
    return rows

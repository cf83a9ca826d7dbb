"""The report's sections, answered from the access store (read-only).

Each function takes a read-only sqlite3 connection and a Window and
returns plain lists/dicts, the JSON contract of `tapio-node report
--format json` (tapio-node(8), REPORT JSON)."""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from tapio_node.store.rows import SA_VOLUME_PREFIX
from tapio_node.store.schema import ACCESS_KEY

# Files that name no object (a downward-API value): in no section but cross-pod.
NOT_OBJECTS = ("downwardAPI",)
DEAD_CONFIG_KINDS = ("configmap", "secret")
PRIVILEGE_KINDS = ("secret", "serviceAccountToken")


@dataclass(frozen=True)
class Window:
    since: float                  # seconds
    now: float
    object: tuple[str, str] | None = None   # (namespace, name) for readers / blast-radius

    @property
    def cutoff(self) -> float:
        # --since 0: no window, everything the store holds.
        return self.now - self.since if self.since > 0 else 0.0


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# The newest naming of each mounted file (a file is named again when its
# pod spec arrives after the volume was first seen).
_NEWEST_MOUNTS = (
    "SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY pod_uid, volume_name, key "
    "ORDER BY last_mounted DESC) AS newest FROM mounts) WHERE newest = 1")
_ACCESS_COLS = ACCESS_KEY + ("cross_pod", "count", "first_seen", "last_seen")
# Accesses recorded before their pod's spec arrived carry the volume's name
# (object_kind == volume_kind, object_name == volume_name): name them as the
# mount inventory does now, so early reads count for the right object.
NAMED_ACCESSES = (
    "(SELECT " + ", ".join(f"coalesce(n.{c}, a.{c}) AS {c}" if c in ("object_kind", "object_name")
                           else f"a.{c} AS {c}" for c in _ACCESS_COLS)
    + f" FROM accesses a LEFT JOIN ({_NEWEST_MOUNTS}) n ON n.pod_uid = a.owner_uid "
    "AND n.volume_name = a.volume_name AND n.key = a.key "
    "AND a.object_kind = a.volume_kind AND a.object_name = a.volume_name)")


def _meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def store_info(conn: sqlite3.Connection) -> dict:
    inv = _meta(conn, "inventory_at")
    created = _meta(conn, "created_at")
    return {"node": _meta(conn, "node_name"), "created_at": rfc3339(float(created)) if created else None,
            "inventory_at": rfc3339(float(inv)) if inv else None}


def _own_reads(conn: sqlite3.Connection) -> set[tuple]:
    """(pod uid, volume, key) read by a process of the pod itself: what
    makes a mounted file used (the kubelet, host programs and other pods
    do not)."""
    return set(conn.execute("SELECT DISTINCT owner_uid, volume_name, key FROM accesses "
                            "WHERE accessor_kind = 'pod' AND cross_pod = 0"))


def _mounted(conn: sqlite3.Connection, w: Window, kinds: tuple[str, ...]) -> list[sqlite3.Row]:
    """Mount rows of these object kinds mounted for at least w.since and
    mounted now (the last inventory) or within the window."""
    inv = float(_meta(conn, "inventory_at") or 0.0)
    marks = ", ".join("?" * len(kinds))
    # A file named again (the pod spec arrived after the volume was first
    # seen) has one row per naming: the newest is the truth.
    return conn.execute(
        "SELECT namespace, pod, pod_uid, workload, object_kind, object_name, volume_name, key, "
        f"first_mounted, last_mounted FROM ({_NEWEST_MOUNTS}) "
        f"WHERE object_kind IN ({marks}) AND last_mounted - first_mounted >= ? "
        "AND last_mounted >= min(?, ?) ORDER BY namespace, workload, pod, volume_name, key",
        (*kinds, w.since, w.cutoff, inv)).fetchall()


def _by_workload(rows, reads: set[tuple]):
    """Group mounts by (namespace, workload or pod uid, volume, object) ->
    {key: (read by any pod of it, first mounted, a pod)}."""
    groups: dict[tuple, dict] = {}
    for ns, pod, uid, workload, okind, oname, vol, key, first, _last in rows:
        g = groups.setdefault((ns, workload or uid, vol, okind, oname), {"pods": [], "keys": {}})
        if pod not in g["pods"]:
            g["pods"].append(pod)
        read, since = g["keys"].get(key, (False, first))
        g["keys"][key] = (read or (uid, vol, key) in reads, min(since, first))
    return groups


def unused(conn: sqlite3.Connection, w: Window) -> list[dict]:
    """Objects and keys mounted for at least w.since and never read by
    their pod, per workload. A whole object never read is one entry with
    key null; an object read in part lists its unread keys."""
    reads = _own_reads(conn)
    out = []
    rows = [r for r in _mounted(conn, w, DEAD_CONFIG_KINDS) if not r[6].startswith(SA_VOLUME_PREFIX)]
    for (ns, workload, vol, kind, name), g in _by_workload(rows, reads).items():
        keys = g["keys"]
        base = {"namespace": ns, "pod": g["pods"][0], "workload": workload if "/" in workload else None,
                "kind": kind, "name": name, "volume": vol, "pods": len(g["pods"])}
        if not any(read for read, _ in keys.values()):
            since = min(s for _, s in keys.values())
            out.append({**base, "key": None, "mounted_since": rfc3339(since)})
            continue
        for key, (read, since) in sorted(keys.items()):
            if not read:
                out.append({**base, "key": key, "mounted_since": rfc3339(since)})
    return out


def least_privilege(conn: sqlite3.Connection, w: Window) -> list[dict]:
    """Workloads that mount a Secret or service-account token none of their
    pods ever read, with the pod-spec change that drops it."""
    reads = _own_reads(conn)
    vkinds = dict(conn.execute("SELECT DISTINCT volume_name, volume_kind FROM mounts"))
    out = []
    for (ns, workload, vol, kind, name), g in _by_workload(_mounted(conn, w, PRIVILEGE_KINDS), reads).items():
        if any(read for read, _ in g["keys"].values()):
            continue
        out.append({"namespace": ns, "workload": workload if "/" in workload else None,
                    "pod": g["pods"][0], "kind": kind, "name": name, "volume": vol,
                    "suggestion": suggestion(kind, name, vol, vkinds.get(vol, ""))})
    return out


def suggestion(kind: str, name: str, volume: str, volume_kind: str) -> str:
    if kind == "serviceAccountToken" and volume.startswith(SA_VOLUME_PREFIX):
        return ("set automountServiceAccountToken: false in the pod spec (the token of service "
                f"account {name} is mounted in {volume} and never read)")
    if kind == "serviceAccountToken":
        return f"remove the serviceAccountToken source from projected volume {volume}"
    if volume_kind == "projected":
        return f"remove the secret {name} source from projected volume {volume}"
    return f"drop volume {volume} (secret {name}) and its volumeMounts from the pod spec"


_READER = ("accessor_kind", "accessor_namespace", "accessor_workload", "accessor_pod",
           "accessor_container", "host_cgroup", "command")


def reader(kind, ns, workload, pod, container, cgroup, command, count, last) -> dict:
    return {"kind": kind, "namespace": ns or None, "workload": workload or None, "pod": pod or None,
            "container": container or None, "host_cgroup": cgroup or None, "command": command,
            "count": count, "last_read": rfc3339(last)}


def _object_filter(w: Window) -> tuple[str, tuple]:
    if w.object is None:
        return "", ()
    return " AND owner_namespace = ? AND object_name = ?", w.object


def readers(conn: sqlite3.Connection, w: Window) -> list[dict]:
    """Per object: who read it (workloads, containers, host units, the
    kubelet), how often and when last, over rows seen within the window."""
    extra, args = _object_filter(w)
    marks = ", ".join("?" * len(NOT_OBJECTS))
    rows = conn.execute(
        f"SELECT owner_namespace, object_kind, object_name, {', '.join(_READER)}, "
        f"sum(count), max(last_seen) FROM {NAMED_ACCESSES} "
        f"WHERE last_seen >= ? AND object_kind NOT IN ({marks}){extra} "
        f"GROUP BY 1, 2, 3, {', '.join(str(i) for i in range(4, 4 + len(_READER)))} "
        "ORDER BY 1, 3, 2, 11 DESC", (w.cutoff, *NOT_OBJECTS, *args)).fetchall()
    out: dict[tuple, dict] = {}
    for ns, kind, name, *rest in rows:
        obj = out.get((ns, kind, name))
        if obj is None:
            obj = out[(ns, kind, name)] = {"namespace": ns, "kind": kind, "name": name, "reads": 0,
                                           "last_read": None, "readers": [], "_last": 0.0}
        r = reader(*rest)
        obj["readers"].append(r)
        obj["reads"] += rest[7]
        obj["_last"] = max(obj["_last"], rest[8])
    for obj in out.values():
        obj["last_read"] = rfc3339(obj.pop("_last"))
    return list(out.values())


def cross_pod(conn: sqlite3.Connection, w: Window) -> list[dict]:
    """Reads of a pod's volume by another pod or a host process, within the window."""
    rows = conn.execute(
        "SELECT owner_namespace, owner_pod, owner_workload, object_kind, object_name, key, "
        f"{', '.join(_READER)}, count, last_seen FROM {NAMED_ACCESSES} "
        "WHERE cross_pod = 1 AND last_seen >= ? ORDER BY last_seen DESC", (w.cutoff,)).fetchall()
    out = []
    for ns, pod, workload, kind, name, key, *rest in rows:
        acc = reader(*rest)
        out.append({"owner": {"namespace": ns or None, "pod": pod or None, "workload": workload or None},
                    "kind": kind, "name": name, "key": key or None, "accessor": acc,
                    "count": rest[7], "last_read": acc["last_read"],
                    "cross_namespace": acc["kind"] == "pod" and (acc["namespace"] or "") != ns})
    return out


def blast_radius(conn: sqlite3.Connection, w: Window) -> list[dict]:
    """For w.object: per kind of object of that name, the workloads (and
    host units, the kubelet) that read it, how much and how recently, and
    the workloads that mount it."""
    if w.object is None:
        raise ValueError("blast-radius needs --object NAMESPACE/NAME")
    ns, name = w.object
    marks = ", ".join("?" * len(NOT_OBJECTS))
    readers_ = conn.execute(
        "SELECT object_kind, accessor_kind, accessor_namespace, accessor_workload, "
        f"count(DISTINCT accessor_pod), sum(count), max(last_seen) FROM {NAMED_ACCESSES} "
        f"WHERE owner_namespace = ? AND object_name = ? AND object_kind NOT IN ({marks}) "
        "GROUP BY 1, 2, 3, 4 ORDER BY 7 DESC", (ns, name, *NOT_OBJECTS)).fetchall()
    mounts = conn.execute(
        "SELECT object_kind, workload, count(DISTINCT pod_uid), min(first_mounted), max(last_mounted) "
        f"FROM mounts WHERE namespace = ? AND object_name = ? AND object_kind NOT IN ({marks}) "
        "GROUP BY 1, 2 ORDER BY 2", (ns, name, *NOT_OBJECTS)).fetchall()
    out: dict[str, dict] = {}

    def entry(kind):
        return out.setdefault(kind, {"namespace": ns, "kind": kind, "name": name, "readers": [],
                                     "mounted_by": []})

    for kind, akind, ans, aworkload, pods, count, last in readers_:
        entry(kind)["readers"].append({"kind": akind, "namespace": ans or None,
                                       "workload": aworkload or None, "pods": pods,
                                       "count": count, "last_read": rfc3339(last)})
    for kind, workload, pods, first, last in mounts:
        entry(kind)["mounted_by"].append({"workload": workload or None, "pods": pods,
                                          "first_mounted": rfc3339(first), "last_mounted": rfc3339(last)})
    return list(out.values())


def top(conn: sqlite3.Connection, w: Window, limit: int = 20) -> list[dict]:
    """The most read objects within the window."""
    marks = ", ".join("?" * len(NOT_OBJECTS))
    rows = conn.execute(
        "SELECT owner_namespace, object_kind, object_name, sum(count), "
        "count(DISTINCT accessor_kind || '/' || accessor_namespace || '/' || accessor_workload), "
        f"max(last_seen) FROM {NAMED_ACCESSES} WHERE last_seen >= ? AND object_kind NOT IN ({marks}) "
        "GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1, 3 LIMIT ?", (w.cutoff, *NOT_OBJECTS, limit)).fetchall()
    return [{"namespace": ns, "kind": kind, "name": name, "reads": reads, "readers": nreaders,
             "last_read": rfc3339(last)} for ns, kind, name, reads, nreaders, last in rows]


def new(conn: sqlite3.Connection, w: Window) -> list[dict]:
    """(accessor workload, object) pairs first seen within the window."""
    marks = ", ".join("?" * len(NOT_OBJECTS))
    rows = conn.execute(
        "SELECT accessor_kind, accessor_namespace, accessor_workload, owner_namespace, object_kind, "
        f"object_name, min(first_seen), sum(count) FROM {NAMED_ACCESSES} "
        f"WHERE object_kind NOT IN ({marks}) GROUP BY 1, 2, 3, 4, 5, 6 HAVING min(first_seen) >= ? "
        "ORDER BY 7 DESC", (*NOT_OBJECTS, w.cutoff)).fetchall()
    return [{"accessor": {"kind": k, "namespace": ans or None, "workload": aw or None},
             "namespace": ns, "kind": kind, "name": name, "first_seen": rfc3339(first), "count": count}
            for k, ans, aw, ns, kind, name, first, count in rows]


# CLI section name -> (JSON key, function).
SECTIONS = {
    "unused": ("unused", unused),
    "readers": ("readers", readers),
    "least-privilege": ("least_privilege", least_privilege),
    "cross-pod": ("cross_pod", cross_pod),
    "blast-radius": ("blast_radius", blast_radius),
    "top": ("top", top),
    "new": ("new", new),
}

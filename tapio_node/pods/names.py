"""Pod namespace and name: from the names of the dirs under /var/log/pods
(`<namespace>_<pod-name>_<pod-uid>`), with the service-account volume's
`namespace` file as a fallback for pods that have no such dir."""

from __future__ import annotations

import os
from typing import Callable

from inotify_simple import flags as F

from tapio_node.host import is_real_dir, stat_is_dir
from tapio_node.k8snames import valid_namespace, valid_pod_name, valid_pod_uid
from tapio_node.pods.oddnames import OddNames
from tapio_node.pods.watch import Watches


def parse_log_dir(name: str) -> tuple[str, str, str] | None:
    """`<namespace>_<pod-name>_<pod-uid>` (a /var/log/pods dir) -> the three
    parts, or None when any part does not validate."""
    parts = name.split("_")
    if len(parts) != 3:
        return None
    ns, pod, uid = parts
    if valid_namespace(ns) and valid_pod_name(pod) and valid_pod_uid(uid):
        return ns, pod, uid
    return None


class PodNames:
    """(namespace, pod name) by pod uid, kept current with inotify on the
    pod logs dir. changed(uid) is called when a pod's names change;
    sa_namespace(uid) reads the fallback."""

    def __init__(self, pod_logs_path: str, watches: Watches, odd: OddNames, *,
                 sa_namespace: Callable[[str], str | None],
                 changed: Callable[[str], None], metrics=None) -> None:
        self.path = pod_logs_path
        self._watches = watches
        self._odd = odd
        self._sa_namespace = sa_namespace
        self._changed = changed
        self._metrics = metrics
        self._log_names: dict[str, tuple[str, str]] = {}
        self._sa_ns: dict[str, str | None] = {}
        self._ok = False                        # the logs dir exists and is watched

    def names(self, pod_uid: str) -> tuple[str | None, str | None]:
        """(namespace, pod name) from the logs dir; else (namespace from the
        service-account volume, None); else (None, None)."""
        names = self._log_names.get(pod_uid)
        if names is not None:
            return names
        if pod_uid in self._sa_ns:
            return self._sa_ns[pod_uid], None
        if not valid_pod_uid(pod_uid):
            return None, None
        ns = self._sa_namespace(pod_uid)
        if len(self._sa_ns) > 65536:
            self._sa_ns.clear()
        self._sa_ns[pod_uid] = ns
        if self._metrics is not None:
            self._metrics.correlation("namespace_file")
        return ns, None

    def attach(self) -> None:
        """Watch the logs dir, or wait for it to appear."""
        if not self._ok:
            self._ok = self._watches.attach(self.path)

    def scan(self) -> int:
        """List the logs dir; the number of pods whose names changed."""
        if not self._ok:
            return 0
        if not is_real_dir(self.path):
            self._lost()
            return 0
        self._watches.watch(self.path)
        found: dict[str, tuple[str, str]] = {}
        try:
            with os.scandir(self.path) as it:
                for ent in it:
                    parsed = self._parse_entry(ent.name, ent)
                    if parsed is not None:
                        found[parsed[2]] = (parsed[0], parsed[1])
        except OSError as e:
            self._odd.skip(f"unreadable pod logs dir ({e.strerror})", self.path)
            return 0
        fixed = 0
        changed = {u for u in found if self._log_names.get(u) != found[u]}
        changed |= {u for u in self._log_names if u not in found}
        self._log_names = found
        for uid in changed:
            fixed += 1
            self._changed(uid)
        return fixed

    def retry_fallbacks(self) -> None:
        """Read again, next time, the fallbacks that found nothing."""
        self._sa_ns = {k: v for k, v in self._sa_ns.items() if v is not None}

    def event(self, ev) -> None:
        """One inotify event on the logs dir."""
        if ev.mask & (F.DELETE_SELF | F.MOVE_SELF):
            self._lost()
            return
        name = ev.name
        if not name:
            return
        if ev.mask & (F.DELETE | F.MOVED_FROM):
            self._dir_gone(name)
        else:
            self._dir_added(name)

    # ---------------------------------------------------------- internals

    def _lost(self) -> None:
        self._ok = False
        uids = list(self._log_names)
        self._log_names.clear()
        for uid in uids:
            self._changed(uid)
        self._watches.wait_for(self.path)

    def _parse_entry(self, name: str, ent: os.DirEntry | None = None):
        path = self.path + "/" + name
        try:
            is_dir = (ent.is_dir(follow_symlinks=False) if ent is not None
                      else stat_is_dir(os.stat(path, follow_symlinks=False)))
        except OSError:
            return None
        if not is_dir:
            self._odd.skip("pod log entry that is not a real dir", path)
            return None
        parsed = parse_log_dir(name)
        if parsed is None:
            self._odd.skip("pod log dir not named <namespace>_<pod>_<uid>", path)
        return parsed

    def _dir_added(self, name: str) -> None:
        parsed = self._parse_entry(name)
        if parsed is None:
            return
        ns, pod, uid = parsed
        if self._log_names.get(uid) != (ns, pod):
            self._log_names[uid] = (ns, pod)
            self._changed(uid)

    def _dir_gone(self, name: str) -> None:
        parsed = parse_log_dir(name)
        if parsed is None:
            return
        ns, pod, uid = parsed
        if self._log_names.get(uid) == (ns, pod):
            del self._log_names[uid]
            self._changed(uid)

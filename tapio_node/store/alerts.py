"""The new-reader alert: one journald record (its own MESSAGE_ID, priority
warning) when, after the learning period, a workload, host unit or the
kubelet reads an object it was never seen reading on this node."""
from __future__ import annotations

import os
import sys

from tapio_node.host import JOURNAL_SOCKET
from tapio_node.store import schema

# `journalctl MESSAGE_ID=...` finds every new-reader record: a contract.
NEW_READER_MESSAGE_ID = "65d09548f88343db969a12abd1431e30"
PRIORITY_WARNING = 4

_I = {c: i for i, c in enumerate(schema.ACCESS_KEY)}


def reader_text(key: tuple) -> str:
    kind = key[_I["accessor_kind"]]
    if kind == "pod":
        ns, workload = key[_I["accessor_namespace"]], key[_I["accessor_workload"]]
        return f"workload {ns}/{workload}" if workload else f"pod {ns}/{key[_I['accessor_pod']]}"
    if kind == "kubelet":
        return "the kubelet"
    return f"host process {key[_I['command']]} ({key[_I['host_cgroup']] or 'cgroup unknown'})"


def alert_fields(key: tuple, identifier: str = "tapio-node") -> dict[str, str]:
    g = lambda c: key[_I[c]]  # noqa: E731
    fields = {
        "MESSAGE": f"new reader: {reader_text(key)} read {g('object_kind')} "
                   f"{g('owner_namespace')}/{g('object_name')} (key {g('key') or '?'}) for the first time",
        "MESSAGE_ID": NEW_READER_MESSAGE_ID,
        "PRIORITY": str(PRIORITY_WARNING),
        "SYSLOG_IDENTIFIER": identifier,
        "TAPIO_NAMESPACE": g("owner_namespace"),
        "TAPIO_OBJECT_KIND": g("object_kind"),
        "TAPIO_CONFIG_NAME": g("object_name"),
        "TAPIO_VOLUME": g("volume_name"),
        "TAPIO_FILE": g("key"),
        "TAPIO_POD_NAME": g("owner_pod"),
        "TAPIO_ACCESSOR_KIND": g("accessor_kind"),
        "TAPIO_ACCESSOR_NAMESPACE": g("accessor_namespace"),
        "TAPIO_ACCESSOR_WORKLOAD": g("accessor_workload"),
        "TAPIO_ACCESSOR_POD": g("accessor_pod"),
        "TAPIO_CONTAINER_ID": g("accessor_container"),
        "TAPIO_HOST_CGROUP": g("host_cgroup"),
        "TAPIO_PROCESS_COMM": g("command"),
    }
    return {k: v for k, v in fields.items() if v}


class NewReaderAlerts:
    """Sends alerts to journald when its socket is there, else to stderr
    (one line, sd-daemon priority prefix)."""

    def __init__(self, socket_path: str = JOURNAL_SOCKET, stream=None):
        self._stream = stream
        self._sendv = None
        self.sent = 0
        if os.path.exists(socket_path):
            try:
                from systemd.journal import sendv
                self._sendv = sendv
            except ImportError:
                pass

    def send(self, key: tuple) -> None:
        fields = alert_fields(key)
        self.sent += 1
        if self._sendv is not None:
            try:
                self._sendv(*(f"{k}={v}" for k, v in fields.items()))
                return
            except OSError:
                pass
        stream = self._stream or sys.stderr
        stream.write(f"<{PRIORITY_WARNING}>{fields['MESSAGE'].replace(chr(10), ' ')}\n")
        stream.flush()

"""Enforcement's kernel side: policy_mode, the policy maps, and the pinned
BPF LSM link that keeps denying while the daemon is down.

While enforcing, the link of lsm_config_access is pinned under pin_path: a
crash or SIGKILL leaves it attached (with the maps it holds), so there is no
window in which another pod's secret can be read. The next start takes it
over once its own program is attached and its maps are filled; an orderly
stop (SIGTERM) removes it. The decision itself is the kernel's
(bpf/tapio.bpf.c policy_verdict)."""
from __future__ import annotations

import logging
import os

from tapio_node.kernel import backends, wire

log = logging.getLogger("tapio_node.kernel")

LINK_PIN = "enforce_link"
MODES = {"off": wire.POLICY_OFF, "audit": wire.POLICY_AUDIT, "enforce": wire.POLICY_ENFORCE}
MAPS = ("volume_policy", "policy_host_allow", "policy_pod_allow")
MAX_ALLOWED_PODS = 4096  # policy_pod_allow's max_entries


def enforce_unavailable(backend: str, availability: dict | None = None) -> str | None:
    """Why `enforce` cannot run on this backend, with the fix; None if it can."""
    if backend == backends.LSM:
        return None
    why = ""
    a = (availability or {}).get(backends.LSM)
    if a is not None and not a.ok:
        why = f": {a.why}"
    return (f"enforcement.mode enforce needs the lsm backend (the {backend} backend can only "
            f"report){why}; {backends.ENABLE_LSM}, or use mode: audit")


class KernelPolicy:
    """The policy state of one loaded Kernel."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.mode = "off"
        self._host_allow: set[str] = set()
        self._pod_allow: set[str] = set()
        self.link_pinned = False

    @property
    def link_path(self) -> str | None:
        pin = self.kernel.pin_path
        return os.path.join(pin, LINK_PIN) if pin else None

    def set_mode(self, mode: str) -> None:
        why = enforce_unavailable(self.kernel.backend) if mode == "enforce" else None
        if why:
            raise ValueError(why)
        self.kernel.obj.set_u32(".bss", "policy_mode", MODES[mode])
        self.mode = mode
        if self.link_pinned and mode != "enforce":
            self.release()

    def set_host_allow(self, names) -> None:
        self._host_allow = self._sync("policy_host_allow", self._host_allow, set(names),
                                      wire.host_allow_key)

    def set_pod_allow(self, uids) -> None:
        want = set(uids)
        if len(want) > MAX_ALLOWED_PODS:
            log.warning("enforcement.allow_pods matches %d pods; only %d fit in the kernel's "
                        "map, the others stay denied", len(want), MAX_ALLOWED_PODS)
            want = set(sorted(want)[:MAX_ALLOWED_PODS])
        self._pod_allow = self._sync("policy_pod_allow", self._pod_allow, want, wire.pack_uid)

    def _sync(self, name: str, have: set[str], want: set[str], key) -> set[str]:
        m = self.kernel.maps[name]
        for item in want - have:
            m.update(key(item), wire.U32.pack(1))
        for item in have - want:
            m.delete(key(item))
        return want

    def hold(self) -> None:
        """Once the maps are filled: with enforce, pin our link in place of
        the one a previous run left; otherwise remove such a pin."""
        path = self.link_path
        if path is None or self.link_pinned:
            return
        left = os.path.exists(path)
        if left:
            os.unlink(path)  # its link detaches: ours is already attached
        if self.mode == "enforce":
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            self.kernel.obj.pin_link(backends.HOOK_PROGRAMS[backends.LSM], path)
            self.link_pinned = True
            log.info("enforcing: the LSM link is pinned at %s%s", path,
                     " (taken over from the previous run)" if left else "")
        elif left:
            log.warning("removed the enforcing LSM link a previous run left at %s "
                        "(enforcement.mode is %s now)", path, self.mode)

    def release(self) -> None:
        """An orderly stop: unpin the link, so it detaches with our fd."""
        if not self.link_pinned:
            return
        self.link_pinned = False
        try:
            os.unlink(self.link_path)
        except FileNotFoundError:
            pass
        log.warning("enforcement detached: protected volumes can be read by any process again")

"""The enforcement policy, user space's part: a pod's protected volumes
(the kinds in enforcement.kinds) may be opened only by that pod's own
processes, the kubelet, the host units in allow_host_cgroups and the pods
matching allow_pods. The kernel decides each open (bpf/tapio.bpf.c,
policy_verdict); this keeps what it decides from up to date: which volumes
are protected and whose, and who is allowed.

A brand-new pod reading its own volume is allowed without us: the kernel
compares the opener's cgroup path with the volume's owner. Only an
allow_pods accessor depends on us catching up (its UID is learnt from its
logs dir): its first reads may be denied for up to one PERIODIC tick."""
from __future__ import annotations

import fnmatch
import logging

log = logging.getLogger("tapio_node.enforcement")


class Enforcer:
    """kernel_policy: the Kernel's KernelPolicy; volumes: the VolumeIndex."""

    def __init__(self, kernel_policy, volumes):
        self.kernel = kernel_policy
        self.volumes = volumes
        self.kinds: frozenset[str] = frozenset()
        self.allow_pods: tuple[str, ...] = ()

    @property
    def mode(self) -> str:
        return self.kernel.mode

    def protects(self, kind: str) -> bool:
        return kind in self.kinds

    def apply(self, en, kubelet_cgroups) -> None:
        """Start-up and SIGHUP: the mode, the kinds and the allow lists.
        ValueError (and nothing changed) if the backend cannot do the mode."""
        changed = en.mode != self.kernel.mode
        self.kernel.set_mode(en.mode)
        # The kubelet writes every volume: always allowed, listed or not.
        self.kernel.set_host_allow(set(en.allow_host_cgroups) | set(kubelet_cgroups))
        kinds = frozenset(en.kinds)
        if kinds != self.kinds:
            self.kinds = kinds
            self.volumes.refresh_policy()
        self.allow_pods = tuple(en.allow_pods)
        if changed:
            log.warning("enforcement %s: %s", en.mode, {
                "off": "no verdicts",
                "audit": "opens other pods may not make are reported (policy would_deny), none blocked",
                "enforce": "opens other pods may not make fail with EACCES"}[en.mode])

    def allowed_pod(self, namespace: str | None, name: str | None) -> bool:
        if not namespace or not name:
            return False
        full = f"{namespace}/{name}"
        return any(fnmatch.fnmatchcase(full, pat) for pat in self.allow_pods)

    def refresh_pods(self, pods) -> None:
        """pods: the PodRegistry (uids and their names), or None."""
        if pods is None or not self.allow_pods:
            self.kernel.set_pod_allow(())
            return
        self.kernel.set_pod_allow(uid for uid in pods.pod_uids()
                                  if self.allowed_pod(*pods.pod_names(uid)))

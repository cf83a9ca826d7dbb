"""The hook backends, what each needs from the kernel, and how one is chosen
(config key `hook_backend: auto | lsm | fentry | tracepoint`).

- lsm: `lsm/file_open`, a BPF LSM program. Needs CONFIG_BPF_LSM and `bpf`
  among the active LSMs (the `lsm=` boot parameter).
- fentry: fexit on `security_file_open` (bpf/tapio.bpf.c says why fexit).
  Needs BPF trampolines and a kernel whose lockdown allows them.
- tracepoint: the syscall exit tracepoints and io_uring's completion. Runs
  wherever tracefs does; every syscall then takes the slow path.

The two security_file_open backends see every open with one program and
set no syscall-trace flag; both also need bpf_task_pt_regs (5.15) to name
the syscall from the task's saved registers. `auto` is the first of lsm,
fentry, tracepoint that attaches; the loader proves a hook runs before it
keeps it (a BPF LSM program attaches where bpf is not an active LSM, and
then never runs).
"""
from __future__ import annotations

import os

import msgspec

from tapio_node import host
from tapio_node.kernel import compat, sysbpf

LSM, FENTRY, TRACEPOINT = "lsm", "fentry", "tracepoint"
ORDER = (LSM, FENTRY, TRACEPOINT)
CHOICES = ("auto", *ORDER)
# The one program each security_file_open backend attaches.
HOOK_PROGRAMS = {LSM: "lsm_config_access", FENTRY: "fexit_config_access"}
HOOKS = {LSM: "lsm/file_open", FENTRY: "fexit/security_file_open",
         TRACEPOINT: "syscalls/sys_exit_open*, io_uring/io_uring_complete"}
ENABLE_LSM = ("add bpf to the kernel's lsm= boot parameter (e.g. "
              "lsm=lockdown,capability,landlock,yama,apparmor,bpf) and reboot")


class Availability(msgspec.Struct, frozen=True, kw_only=True):
    backend: str
    ok: bool
    why: str        # what was found: "attach allowed", or why it cannot attach
    fix: str = ""   # what would make it available


def _lsm(features: dict[str, compat.Feature]) -> Availability:
    if not features[compat.TASK_PT_REGS].available:
        return Availability(backend=LSM, ok=False, why="needs bpf_task_pt_regs (5.15) to name the syscall",
                            fix="a kernel >= 5.15")
    ok, why = sysbpf.probe_attach(sysbpf.BPF_PROG_TYPE_LSM, sysbpf.BPF_LSM_MAC, "bpf_lsm_file_open")
    if not ok:
        return Availability(backend=LSM, ok=False, why=why + _lockdown_note(),
                            fix="a kernel with CONFIG_BPF_LSM=y and no lockdown; " + ENABLE_LSM)
    lsms, source = host.active_lsms()
    if lsms is None:
        return Availability(backend=LSM, ok=True,
                            why=f"attach allowed ({source}; whether the hook runs is proved at start)")
    if "bpf" not in lsms:
        return Availability(backend=LSM, ok=False,
                            why=f"bpf is not an active LSM ({','.join(lsms)}, from {source})", fix=ENABLE_LSM)
    return Availability(backend=LSM, ok=True, why=f"attach allowed, bpf is an active LSM (from {source})")


def _fentry(features: dict[str, compat.Feature]) -> Availability:
    if not features[compat.TASK_PT_REGS].available:
        return Availability(backend=FENTRY, ok=False, why="needs bpf_task_pt_regs (5.15) to name the syscall",
                            fix="a kernel >= 5.15")
    ok, why = sysbpf.probe_attach(sysbpf.BPF_PROG_TYPE_TRACING, sysbpf.BPF_TRACE_FEXIT, "security_file_open")
    return Availability(backend=FENTRY, ok=ok, why=why + ("" if ok else _lockdown_note()),
                        fix="" if ok else "a kernel with CONFIG_DEBUG_INFO_BTF and BPF trampolines, "
                                          "without lockdown")


def _tracepoint() -> Availability:
    root = host.tracefs_root()
    if root is None:
        return Availability(backend=TRACEPOINT, ok=False, why="tracefs is not mounted",
                            fix="mount -t tracefs tracefs /sys/kernel/tracing")
    if not os.path.isdir(os.path.join(root, "events", "syscalls", "sys_exit_openat")):
        return Availability(backend=TRACEPOINT, ok=False, why="no syscalls/sys_exit_openat tracepoint",
                            fix="a kernel with CONFIG_FTRACE_SYSCALLS=y")
    return Availability(backend=TRACEPOINT, ok=True, why="syscalls/sys_exit_openat present")


def _lockdown_note() -> str:
    mode = sysbpf.lockdown()
    return f"; kernel lockdown: {mode}" if mode and mode != "none" else ""


def probe(features: dict[str, compat.Feature] | None = None) -> dict[str, Availability]:
    """Each backend: can it attach here, and why (not)."""
    if features is None:
        features = compat.probe()
    return {LSM: _lsm(features), FENTRY: _fentry(features), TRACEPOINT: _tracepoint()}


class BackendUnavailable(RuntimeError):
    """The configured hook_backend cannot attach; the message says why and what to do."""


def candidates(choice: str, avail: dict[str, Availability]) -> list[str]:
    """The backends to try, best first: every available one for auto, else
    the configured one (BackendUnavailable when it cannot attach)."""
    if choice == "auto":
        found = [b for b in ORDER if avail[b].ok]
        if not found:
            raise BackendUnavailable("no hook backend can attach here: " + "; ".join(
                f"{b}: {a.why}" for b, a in avail.items()))
        return found
    if choice not in avail:
        raise BackendUnavailable(f"hook_backend must be one of {', '.join(CHOICES)}, got {choice!r}")
    a = avail[choice]
    if not a.ok:
        raise BackendUnavailable(f"hook_backend {choice} ({HOOKS[choice]}) cannot attach: {a.why}"
                                 + (f" — fix: {a.fix}" if a.fix else ""))
    return [choice]

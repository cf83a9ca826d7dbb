"""`tapio-node check`: can the daemon run here, and if not, what to do.

Each probe asks the kernel itself where it can (create a map, load and
attach a tiny program) instead of guessing from version numbers. One line
per check: ✔ ok, ✘ the daemon cannot run (exit 1), ⚠ it runs with less.
The daemon's `preflight()` runs the same fatal checks and prints the same
lines when it refuses to start.
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys

import msgspec

from . import host
from .kernel import backends, compat
from .kernel.sysbpf import (BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_RINGBUF, errno_text as _errno_text,
                           libc as _libc, map_create as _map_create)

__all__ = ["Check", "run_checks", "preflight", "main", "format_check"]

OK, FAIL, WARN = "✔", "✘", "⚠"

# Capability numbers (linux/capability.h).
CAP_DAC_READ_SEARCH = 2
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
CAP_PERFMON = 38
CAP_BPF = 39

# Syscall exit tracepoints the kernel program attaches (arm64 has no open/creat).
REQUIRED_TRACEPOINTS = ("sys_enter_openat", "sys_exit_openat")
OPTIONAL_TRACEPOINTS = ("sys_exit_open", "sys_exit_openat2", "sys_exit_creat", "sys_exit_open_by_handle_at")


class Check(msgspec.Struct, kw_only=True):
    name: str
    ok: bool
    fatal: bool          # the daemon cannot run when this fails
    detail: str
    fix: str = ""


def format_check(c: Check) -> str:
    mark = OK if c.ok else (FAIL if c.fatal else WARN)
    line = f"{mark} {c.name}: {c.detail}"
    if not c.ok and c.fix:
        line += f" — fix: {c.fix}"
    return line


# -- helpers


# -- the checks


def check_root() -> Check:
    uid = os.geteuid()
    return Check(name="running as root", ok=uid == 0, fatal=False,
                 detail="euid 0" if uid == 0 else f"euid {uid}; the capabilities below must be granted instead",
                 fix="run as root (the systemd unit does), or grant CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH "
                     "CAP_SYS_RESOURCE")


def check_caps() -> list[Check]:
    eff = host.cap_eff()
    has = lambda cap: bool(eff >> cap & 1)  # noqa: E731
    admin = has(CAP_SYS_ADMIN)
    missing = []
    if not (has(CAP_BPF) or admin):
        missing.append("CAP_BPF")
    if not (has(CAP_PERFMON) or admin):
        missing.append("CAP_PERFMON")
    checks = [Check(
        name="capabilities (BPF)", ok=not missing, fatal=True,
        detail="CAP_BPF and CAP_PERFMON effective" + (" (via CAP_SYS_ADMIN)" if admin and not
                                                       (has(CAP_BPF) and has(CAP_PERFMON)) else "")
        if not missing else f"missing {', '.join(missing)} (CapEff {eff:#x})",
        fix="run as root, or AmbientCapabilities=CAP_BPF CAP_PERFMON in the unit (kernel >= 5.8)",
    )]
    # The systemd unit grants CAP_BPF CAP_PERFMON CAP_SYS_RESOURCE
    # CAP_DAC_READ_SEARCH and CAP_SYS_ADMIN (perf_event_open on Debian's
    # kernels: see check_tracepoint_attach).
    soft = [(CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH", "reading volume files not owned by root (fsGroup, defaultMode)"),
            (CAP_SYS_RESOURCE, "CAP_SYS_RESOURCE", "raising RLIMIT_MEMLOCK on kernels before 5.11")]
    lacking = [(n, why) for cap, n, why in soft if not has(cap)]
    checks.append(Check(
        name="capabilities (other)", ok=not lacking, fatal=False,
        detail="CAP_DAC_READ_SEARCH and CAP_SYS_RESOURCE effective" if not lacking
        else "missing " + "; ".join(f"{n} ({why})" for n, why in lacking),
        fix="run as root or add them to the unit's AmbientCapabilities=",
    ))
    return checks


def check_btf() -> Check:
    ok = os.access(host.BTF_PATH, os.R_OK)
    return Check(name="kernel BTF", ok=ok, fatal=True,
                 detail=f"{host.BTF_PATH} ({os.path.getsize(host.BTF_PATH) // 1024} KiB)" if ok
                 else f"{host.BTF_PATH} missing",
                 fix="use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian 11+, Ubuntu 20.10+, RHEL 8.2+)")


def check_bpf_syscall() -> list[Check]:
    r = _map_create(BPF_MAP_TYPE_ARRAY, 4, 4, 1)
    if r < 0:
        e = -r
        fix = {errno.EPERM: "run as root / grant CAP_BPF; check sysctl kernel.unprivileged_bpf_disabled "
                            "and seccomp (container runtimes block bpf(2) by default)",
               errno.ENOSYS: "use a kernel with CONFIG_BPF_SYSCALL=y"}.get(e, "see dmesg")
        return [Check(name="bpf() syscall", ok=False, fatal=True,
                      detail=f"creating a 1-entry array map failed: {_errno_text(e)}", fix=fix)]
    checks = [Check(name="bpf() syscall", ok=True, fatal=True, detail="array map created and closed")]
    r = _map_create(BPF_MAP_TYPE_RINGBUF, 0, 0, 4096)
    checks.append(Check(
        name="BPF ring buffer", ok=r >= 0, fatal=True,
        detail="ring buffer map created and closed" if r >= 0 else f"ring buffer map refused: {_errno_text(-r)}",
        fix="use a kernel >= 5.8 (BPF_MAP_TYPE_RINGBUF)"))
    return checks


def check_tracepoints() -> list[Check]:
    root = host.tracefs_root()
    if root is None:
        return [Check(name="tracefs", ok=False, fatal=True, detail="not mounted at /sys/kernel/tracing",
                      fix="mount -t tracefs tracefs /sys/kernel/tracing")]
    checks = [Check(name="tracefs", ok=True, fatal=True, detail=f"mounted at {root}")]
    events = os.path.join(root, "events", "syscalls")
    missing = [t for t in REQUIRED_TRACEPOINTS if not os.path.isdir(os.path.join(events, t))]
    checks.append(Check(
        name="syscall tracepoints", ok=not missing, fatal=True,
        detail=f"{', '.join(REQUIRED_TRACEPOINTS)} present" if not missing
        else f"missing {', '.join(missing)} under {events}",
        fix="use a kernel with CONFIG_FTRACE_SYSCALLS=y"))
    if not missing:
        checks.append(check_tracepoint_attach(os.path.join(events, "sys_exit_openat", "id")))
    absent = [t for t in OPTIONAL_TRACEPOINTS if not os.path.isdir(os.path.join(events, t))]
    checks.append(Check(
        name="other open tracepoints", ok=not absent, fatal=False,
        detail=f"{', '.join(OPTIONAL_TRACEPOINTS)} present" if not absent
        else f"{', '.join(absent)} absent (those opens are not seen; normal on arm64 for open/creat)",
        fix="nothing to do unless this kernel should have them"))
    return checks


_SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}.get(os.uname().machine, 298)
PERF_TYPE_TRACEPOINT = 2


def _paranoid() -> int | None:
    try:
        with open("/proc/sys/kernel/perf_event_paranoid") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def check_tracepoint_attach(id_path: str) -> Check:
    """Open (and close at once) a perf event on a syscall tracepoint, as
    attaching our programs does: Debian's kernels add perf_event_paranoid=3,
    under which only CAP_SYS_ADMIN may, whatever CAP_PERFMON says."""
    name = "tracepoint attach"
    try:
        with open(id_path) as f:
            tp_id = int(f.read())
    except (OSError, ValueError) as e:
        return Check(name=name, ok=False, fatal=True, detail=f"cannot read {id_path}: {e}",
                     fix="run as root (tracefs event ids are readable by root only)")
    attr = bytearray(128)
    struct.pack_into("<IIQQ", attr, 0, PERF_TYPE_TRACEPOINT, len(attr), tp_id, 1)   # period 1
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(_SYS_PERF_EVENT_OPEN), buf, ctypes.c_int(-1), ctypes.c_int(0),
                      ctypes.c_int(-1), ctypes.c_ulong(8))   # pid -1, cpu 0, PERF_FLAG_FD_CLOEXEC
    if fd >= 0:
        os.close(fd)
        return Check(name=name, ok=True, fatal=True, detail="perf_event_open on syscalls/sys_exit_openat allowed")
    err = ctypes.get_errno()
    paranoid = _paranoid()
    fix = ("grant CAP_SYS_ADMIN: this kernel has kernel.perf_event_paranoid="
           f"{paranoid} (Debian's extra level), where CAP_PERFMON is not enough"
           if paranoid is not None and paranoid >= 3 else "run as root or grant CAP_PERFMON")
    return Check(name=name, ok=False, fatal=True,
                 detail=f"perf_event_open on syscalls/sys_exit_openat refused: {_errno_text(err)}", fix=fix)


def check_hooks(choice: str, have_tracepoints: bool,
                only_fatal: bool = False) -> tuple[list[Check], str | None]:
    """Which hook backend the daemon would use (fatal if none), and for
    each backend whether it can attach here and why (kernel/backends.py);
    also that backend's name (None if none)."""
    avail = backends.probe()
    if not have_tracepoints:
        t = avail[backends.TRACEPOINT]
        avail[backends.TRACEPOINT] = backends.Availability(
            backend=t.backend, ok=False, why="see the tracefs and tracepoint checks", fix=t.fix)
    chosen = None
    try:
        chosen = backends.candidates(choice, avail)[0]
        chosen_check = Check(name="hook backend", ok=True, fatal=True,
                             detail=f"{chosen} ({backends.HOOKS[chosen]})"
                             + (" chosen by auto" if choice == "auto" else " set by hook_backend"))
    except backends.BackendUnavailable as exc:
        chosen_check = Check(name="hook backend", ok=False, fatal=True, detail=str(exc),
                             fix="set kernel_collector.hook_backend to auto, or make the kernel allow it")
    if only_fatal:
        return [chosen_check], chosen
    out = [chosen_check]
    for b, a in avail.items():
        out.append(Check(name=f"backend {b} ({backends.HOOKS[b]})", ok=a.ok, fatal=False,
                         detail="available: " + a.why if a.ok else "not available: " + a.why,
                         fix=a.fix))
    return out, chosen


def check_enforcement(mode: str, backend: str | None) -> Check:
    """enforcement.mode against the backend the daemon would use."""
    from tapio_node.kernel.policy import enforce_unavailable

    if mode == "enforce":
        why = enforce_unavailable(backend or "no", backends.probe()) if backend != backends.LSM else None
        if why:
            detail, fix = why.split("; ", 1)
            return Check(name="enforcement", ok=False, fatal=True, detail=detail, fix=fix)
        return Check(name="enforcement", ok=True, fatal=True,
                     detail="enforce: opens of protected volumes by other pods fail with EACCES")
    detail = {"off": "off", "audit": f"audit on the {backend} backend: violations are "
              "reported (policy would_deny), nothing is blocked"}[mode]
    return Check(name="enforcement", ok=True, fatal=False, detail=detail)


def check_kernel_features(backend: str | None) -> list[Check]:
    """What the tracepoint backend adapts to on this kernel
    (tapio_node/kernel/compat.py): never fatal, each missing one says what
    it costs; none matters to a hook backend."""
    out = []
    for f in compat.probe().values():
        if f.available:
            detail = f"present ({f.uses})"
        elif backend in backends.HOOK_PROGRAMS:
            detail = f"absent before {f.since}; the {backend} backend does not need it"
        else:
            detail = f"absent before {f.since}: {f.off}"
        out.append(Check(name=f"kernel feature {f.name}", ok=f.available or backend in backends.HOOK_PROGRAMS,
                         fatal=False, detail=detail, fix=f"a kernel >= {f.since} has it; the daemon runs without it"))
    return out


def check_bpffs(pin_path: str, mounts) -> Check:
    have = any(m.point == "/sys/fs/bpf" and m.fstype == "bpf" for m in mounts)
    if not pin_path:
        return Check(name="bpffs", ok=have, fatal=False,
                     detail="mounted at /sys/fs/bpf" if have else "not mounted (pinning is off)",
                     fix="mount -t bpf bpf /sys/fs/bpf")
    t = host.fs_type_at(pin_path, mounts)
    ok = t == "bpf"
    return Check(name="bpffs", ok=ok, fatal=True,
                 detail=f"pin_path {pin_path} is on bpffs" if ok
                 else f"pin_path {pin_path} is on {t or 'nothing'}, not bpffs",
                 fix="mount -t bpf bpf /sys/fs/bpf (or set kernel_collector.pin_path under a bpffs mount)")


def check_cgroup(cfg) -> list[Check]:
    root = host.cgroup_root(cfg.cgroup_root)
    if not root or not os.path.isdir(root) or not os.path.exists(os.path.join(root, "cgroup.controllers")):
        return [Check(name="cgroup v2", ok=False, fatal=True,
                      detail=f"no cgroup v2 hierarchy (cgroup_root {cfg.cgroup_root!r} -> {root!r})",
                      fix="mount -t cgroup2 none /sys/fs/cgroup/unified, or boot with "
                          "systemd.unified_cgroup_hierarchy=1; or set kernel_collector.cgroup_root")]
    checks = [Check(name="cgroup v2", ok=True, fatal=True, detail=f"at {root}")]
    if os.path.isdir(os.path.join(root, "kubepods.slice")):
        driver, ok = "systemd (kubepods.slice)", True
    elif os.path.isdir(os.path.join(root, "kubepods")):
        driver, ok = "cgroupfs (kubepods)", True
    else:
        driver, ok = "unknown: no kubepods.slice or kubepods under it (kubelet not running here yet?)", False
    checks.append(Check(name="cgroup driver", ok=ok, fatal=False, detail=driver,
                        fix="start the kubelet, or point kernel_collector.cgroup_root at the hierarchy it uses"))
    return checks


def check_dir(name: str, key: str, path: str, consequence: str) -> Check:
    ok = os.path.isdir(path)
    return Check(name=name, ok=ok, fatal=False,
                 detail=f"{path}" if ok else f"{path} missing ({consequence})",
                 fix=f"start the kubelet, or set kernel_collector.{key}")


def check_state_path(path: str) -> Check:
    """The access store's dir: writable (or creatable) and not on a read-only mount."""
    name = "access store"
    if not path:
        return Check(name=name, ok=True, fatal=False, detail="off (state_path is empty)")
    probe = path
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError as e:
        read_only, why = True, f"cannot stat {probe}: {e.strerror}"
    else:
        why = f"{probe} is on a read-only mount"
    ok = not read_only and os.access(probe, os.W_OK)
    if ok:
        detail = os.path.join(path, "access.db") + ("" if probe == path else " (the dir will be made)")
    else:
        detail = f"{path} not writable: {why if read_only else 'permission denied'} (collection goes on; no reports)"
    return Check(name=name, ok=ok, fatal=False, detail=detail,
                 fix="make kernel_collector.state_path writable (the unit's StateDirectory= does), or set it elsewhere")


def check_journald() -> Check:
    ok = os.path.exists(host.JOURNAL_SOCKET)
    return Check(name="journald", ok=ok, fatal=False,
                 detail=host.JOURNAL_SOCKET if ok else f"{host.JOURNAL_SOCKET} missing (--output journal falls back to stderr)",
                 fix="start systemd-journald, or use --output stdout")


def check_listen(listen_address: str) -> Check:
    from .httpd import parse_listen_address

    try:
        host, port = parse_listen_address(listen_address)
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server does
            s.bind(sockaddr)
    except (ValueError, OSError) as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return Check(name="listen address", ok=False, fatal=True,
                     detail=f"cannot bind {listen_address}: {detail}",
                     fix="stop whatever uses the port (ss -ltnp; a running tapio-node holds it), "
                         "or set kernel_collector.listen_address")
    return Check(name="listen address", ok=True, fatal=True, detail=f"{listen_address} is free")


def check_bpf_object() -> Check:
    try:
        from .kernel.loader import object_path
        path = object_path()
    except Exception as e:  # the loader module itself is broken or missing
        return Check(name="BPF object", ok=False, fatal=True, detail=f"cannot locate it: {e}",
                     fix="reinstall tapio-node (or `make build` in a checkout)")
    ok = os.path.isfile(path)
    return Check(name="BPF object", ok=ok, fatal=True, detail=path if ok else f"{path} missing",
                 fix="reinstall tapio-node (or `make build` in a checkout)")


def check_podspecs(cfg) -> list[Check]:
    """Pod-spec sources (static manifests, the API): optional, so never fatal."""
    try:
        from .podspec.check import check_config
        results = check_config(cfg)
    except Exception as e:  # an optional source must not break `check`
        return [Check(name="pod specs", ok=False, fatal=False, detail=f"cannot check: {e}",
                      fix="events will name volumes, not ConfigMaps/Secrets")]
    out = []
    for ok, text, fix in results:
        name, sep, detail = text.partition(": ")
        if not sep:
            name, detail = "pod specs", text
        out.append(Check(name=name, ok=ok, fatal=False, detail=detail, fix=fix))
    return out


def run_checks(cfg, *, only_fatal: bool = False) -> list[Check]:
    """All probes for the KernelCollector config `cfg`, in the order they print.

    only_fatal skips the informational probes (fentry/LSM attach, dirs,
    journald) so the daemon's preflight stays quick.
    """
    mounts = host.mounts()
    checks = [check_root(), *check_caps(), check_btf(), *check_bpf_syscall()]
    tps = check_tracepoints()
    have_tp = all(c.ok for c in tps if c.fatal)
    from tapio_node.config import hook_backend_of

    hooks, backend = check_hooks(hook_backend_of(cfg), have_tp, only_fatal)
    hooks.append(check_enforcement(cfg.enforcement.mode, backend))
    # The tracepoints are needed by that backend, and for syscall sampling.
    need_tp = backend in (None, backends.TRACEPOINT) or cfg.syscall_sampling_rate > 0
    if not need_tp:
        for c in tps:
            if c.fatal and not c.ok:
                c.fatal = False
                c.fix += " (only needed by the tracepoint backend and syscall sampling)"
    checks += tps + hooks
    if not only_fatal:
        checks += check_kernel_features(backend)
    checks += [check_bpffs(cfg.pin_path, mounts), *check_cgroup(cfg), check_bpf_object()]
    if not only_fatal:
        checks += [
            check_dir("kubelet pods dir", "kubelet_pods_path", cfg.kubelet_pods_path,
                      "no volumes to watch until it appears"),
            check_dir("pod logs dir", "pod_logs_path", cfg.pod_logs_path,
                      "namespace and pod names come from pod specs only"),
            check_journald(),
            check_state_path(cfg.state_path),
            *check_podspecs(cfg),
        ]
    checks.append(check_listen(cfg.listen_address))
    return checks


def preflight(cfg) -> list[Check]:
    """The fatal checks that failed; empty means the daemon can try to start."""
    return [c for c in run_checks(cfg, only_fatal=True) if c.fatal and not c.ok]


def main(config_path: str | None = None, out=None) -> int:
    """`tapio-node check [--config F]`: print each check; 1 if any fatal one failed."""
    from .config import ConfigError, KernelCollector, load_config

    out = out or sys.stdout
    try:
        cfg = load_config(config_path).kernel_collector
        checks = [Check(name="config", ok=True, fatal=True, detail=config_path or "defaults")]
    except ConfigError as e:
        # Still probe the machine (with the defaults): the other answers help too.
        cfg = KernelCollector()
        checks = [Check(name="config", ok=False, fatal=True, detail=f"{e} (other checks use the defaults)",
                        fix="correct that key in the config file")]
    checks += run_checks(cfg)
    for c in checks:
        print(format_check(c), file=out)
    failed = [c for c in checks if c.fatal and not c.ok]
    warned = [c for c in checks if not c.fatal and not c.ok]
    if failed:
        print(f"tapio-node cannot run here: {len(failed)} check(s) failed", file=out)
        return 1
    print("tapio-node can run here" + (f" ({len(warned)} warning(s))" if warned else ""), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
